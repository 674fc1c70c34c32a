//! The CUDA device: guarded context and stream, kernel modules compiled on first use, cuBLAS,
//! and the caching pools.

use super::alloc::{DevBuf, Pool, PoolStats};
use super::nvrtc::{self, Nvrtc, Target};
use super::sources::{self, ParamKind};
use crate::backend::trace;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, LaunchConfig};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub type DBuf = DevBuf<f32>;

/// Whether the CUDA driver library can be loaded (checked before any cudarc call: cudarc
/// panics when a library is missing).
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether cuBLAS can be loaded.
pub fn cublas_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}

/// Why there is no usable GPU, in one line, or None when there is one. Cheap: no context.
pub fn unavailable_reason() -> Option<String> {
    if !driver_present() {
        return Some("no CUDA driver found (libcuda.so could not be loaded)".into());
    }
    match CudaContext::device_count() {
        Ok(0) => Some("no CUDA device (the driver reports 0 GPUs)".into()),
        Ok(_) => None,
        Err(e) => Some(format!("no CUDA device (driver: {e})")),
    }
}

/// How many GPUs the driver shows this process.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        bail!("no CUDA driver found (libcuda.so could not be loaded)");
    }
    Ok(CudaContext::device_count().context("cannot count the CUDA devices")? as usize)
}

/// One GPU with its stream, cuBLAS handle, kernels and pools.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    nvrtc: Nvrtc,
    target: Target,
    name: String,
    cc: (i32, i32),
    sms: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Loaded kernels with their parameter kinds (checked at every launch).
    funcs: Mutex<HashMap<&'static str, (CudaFunction, Vec<ParamKind>)>>,
    pub(crate) f32s: Pool<f32>,
    pub(crate) f64s: Pool<f64>,
    pub(crate) i32s: Pool<i32>,
    pub(crate) i64s: Pool<i64>,
}

impl Gpu {
    /// Opens GPU `ordinal`. Every missing piece (driver, device, NVRTC, cuBLAS, an NVRTC that
    /// cannot target the device) is an error saying so; nothing here panics.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if let Some(why) = unavailable_reason() {
            bail!("{why}");
        }
        let nvrtc = Nvrtc::open_default()?;
        if !cublas_present() {
            bail!("cuBLAS not found (libcublas.so could not be loaded; put its folder on LD_LIBRARY_PATH)");
        }
        let ctx = CudaContext::new(ordinal)
            .with_context(|| format!("cannot open CUDA device {ordinal}"))?;
        // One stream: cudarc's per-buffer event tracking (for multi-stream use) is not needed.
        // SAFETY: every buffer of this context is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cc = ctx.compute_capability()?;
        let name = ctx.name()?;
        let sms = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as u32;
        let ccn = (cc.0 * 10 + cc.1) as u32;
        let target = nvrtc::pick_target(ccn, &nvrtc.supported_archs()?).ok_or_else(|| {
            anyhow!(
                "NVRTC {}.{} ({}) cannot compile for sm_{ccn} ({name}); install an NVRTC that supports it (CUDA 12 for Volta)",
                nvrtc.version().0,
                nvrtc.version().1,
                nvrtc.path()
            )
        })?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| anyhow!("cuBLAS: {e:?}"))?;
        Ok(Gpu {
            f32s: Pool::new(stream.clone()),
            f64s: Pool::new(stream.clone()),
            i32s: Pool::new(stream.clone()),
            i64s: Pool::new(stream.clone()),
            ctx,
            stream,
            blas,
            nvrtc,
            target,
            name,
            cc,
            sms,
            modules: Mutex::new(HashMap::new()),
            funcs: Mutex::new(HashMap::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    pub fn multiprocessors(&self) -> u32 {
        self.sms
    }

    pub fn target(&self) -> Target {
        self.target
    }

    pub fn nvrtc(&self) -> &Nvrtc {
        &self.nvrtc
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Compiles (or loads from the disk cache) and loads every module now; returns, per module,
    /// whether it came from the cache.
    pub fn load_all(&self) -> Result<Vec<(&'static str, bool)>> {
        sources::MODULES
            .iter()
            .map(|(m, _)| self.module(m).map(|(_, hit)| (*m, hit)))
            .collect()
    }

    fn module(&self, module: &'static str) -> Result<(Arc<CudaModule>, bool)> {
        if let Some(m) = self.modules.lock().expect("modules lock").get(module) {
            return Ok((m.clone(), true));
        }
        let src = sources::program(module).ok_or_else(|| anyhow!("no kernel module {module}"))?;
        let (image, hit) = nvrtc::compile_cached(
            &self.nvrtc,
            module,
            &src,
            self.target,
            &sources::options(self.target),
        )?;
        let ptx = match self.target {
            Target::Cubin(_) => Ptx::from_binary(image),
            // PTX text without its trailing NUL.
            Target::Ptx(_) => Ptx::from_src(
                String::from_utf8_lossy(&image)
                    .trim_end_matches('\0')
                    .to_string(),
            ),
        };
        let m = self
            .ctx
            .load_module(ptx)
            .with_context(|| format!("loading kernel module {module}"))?;
        self.modules
            .lock()
            .expect("modules lock")
            .insert(module, m.clone());
        Ok((m, hit))
    }

    /// A kernel by module and name (function names are unique across modules) and the kinds
    /// of its parameters from its declaration.
    pub(crate) fn func(
        &self,
        module: &'static str,
        name: &'static str,
    ) -> Result<(CudaFunction, Vec<ParamKind>)> {
        if let Some(f) = self.funcs.lock().expect("funcs lock").get(name) {
            return Ok(f.clone());
        }
        let src = sources::MODULES
            .iter()
            .find(|(m, _)| *m == module)
            .ok_or_else(|| anyhow!("no kernel module {module}"))?
            .1;
        let params = sources::kernel_params(src, name).ok_or_else(|| {
            anyhow!("kernel {name}: not in cuda/{module}.cu or unknown parameter types")
        })?;
        let (m, _) = self.module(module)?;
        let f = m
            .load_function(name)
            .with_context(|| format!("kernel {name} in module {module}"))?;
        self.funcs
            .lock()
            .expect("funcs lock")
            .insert(name, (f.clone(), params.clone()));
        Ok((f, params))
    }

    /// Grid for a grid-stride loop over `n` elements, 256 threads a block.
    pub(crate) fn grid(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.sms as usize * 64);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Splits per channel for the (C, S) reductions: about 4 blocks per multiprocessor in all,
    /// each split at least 1024 elements.
    pub(crate) fn splits(&self, channels: usize, per_channel: usize) -> usize {
        let want = (self.sms as usize * 4).div_ceil(channels.max(1));
        want.clamp(1, per_channel.div_ceil(1024).clamp(1, 256))
    }

    pub fn alloc(&self, n: usize) -> Result<DBuf> {
        self.f32s.alloc(n)
    }

    pub fn zeros(&self, n: usize) -> Result<DBuf> {
        let b = self.f32s.alloc(n)?;
        self.memset(&b, 0)?;
        Ok(b)
    }

    /// Sets every byte of the buffer's elements to `v`.
    fn memset<T>(&self, b: &DevBuf<T>, v: u8) -> Result<()> {
        let bytes = b.len() * std::mem::size_of::<T>();
        if bytes > 0 {
            trace::record("driver", "memset", 0, bytes as u64, 0);
            // SAFETY: the buffer (or view) holds `bytes` bytes at its address.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    b.device_ptr(),
                    v,
                    bytes,
                    self.stream.cu_stream(),
                )
            }?;
        }
        Ok(())
    }

    fn htod<T: DeviceRepr>(&self, x: &[T], b: &DevBuf<T>) -> Result<()> {
        ensure!(
            b.len() >= x.len(),
            "copy of {} values into {}",
            x.len(),
            b.len()
        );
        if !x.is_empty() {
            trace::record_h2d(std::mem::size_of_val(x) as u64);
            self.ctx.bind_to_thread()?;
            // SAFETY: the buffer holds x.len() elements; the copy completes before `x` can be
            // freed because pageable host copies are synchronous with respect to the host.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    b.device_ptr(),
                    x,
                    self.stream.cu_stream(),
                )
            }?;
        }
        Ok(())
    }

    fn dtoh<T: DeviceRepr + Default + Clone>(&self, b: &DevBuf<T>) -> Result<Vec<T>> {
        let mut v = vec![T::default(); b.len()];
        if !v.is_empty() {
            trace::record_d2h(std::mem::size_of_val(v.as_slice()) as u64);
            trace::record_sync();
            self.ctx.bind_to_thread()?;
            // SAFETY: the buffer holds v.len() elements; synchronized before `v` is read.
            unsafe {
                cudarc::driver::result::memcpy_dtoh_async(
                    &mut v,
                    b.device_ptr(),
                    self.stream.cu_stream(),
                )
            }?;
            self.stream.synchronize()?;
        }
        Ok(v)
    }

    pub fn upload(&self, x: &[f32]) -> Result<DBuf> {
        let b = self.f32s.alloc(x.len())?;
        self.htod(x, &b)?;
        Ok(b)
    }

    /// Copies host values into an existing buffer or view (e.g. one tensor of a flat buffer).
    pub fn upload_into(&self, x: &[f32], b: &mut DBuf) -> Result<()> {
        ensure!(
            b.len() == x.len(),
            "upload of {} values into {}",
            x.len(),
            b.len()
        );
        self.htod(x, b)
    }

    pub(crate) fn upload_i32(&self, x: &[i32]) -> Result<DevBuf<i32>> {
        let b = self.i32s.alloc(x.len())?;
        self.htod(x, &b)?;
        Ok(b)
    }

    pub(crate) fn upload_i64(&self, x: &[i64]) -> Result<DevBuf<i64>> {
        let b = self.i64s.alloc(x.len())?;
        self.htod(x, &b)?;
        Ok(b)
    }

    /// f64 values to the device (statistics, the counts a collective sums).
    pub fn upload_f64(&self, x: &[f64]) -> Result<DevBuf<f64>> {
        let b = self.f64s.alloc(x.len())?;
        self.htod(x, &b)?;
        Ok(b)
    }

    pub(crate) fn alloc_f64(&self, n: usize) -> Result<DevBuf<f64>> {
        self.f64s.alloc(n)
    }

    /// Copies to the host (synchronizes the stream). Works on views too.
    pub fn download(&self, b: &DBuf) -> Result<Vec<f32>> {
        self.dtoh(b)
    }

    /// Copies an f64 buffer (statistics) to the host.
    pub fn download_f64(&self, b: &DevBuf<f64>) -> Result<Vec<f64>> {
        self.dtoh(b)
    }

    pub fn synchronize(&self) -> Result<()> {
        trace::record_sync();
        self.stream.synchronize()?;
        Ok(())
    }

    /// Fills every buffer the pools hand out with NaN bytes from now on (tests: an output
    /// element a kernel does not write shows up as NaN).
    pub fn set_poison(&self, on: bool) {
        self.f32s.set_poison(on);
        self.f64s.set_poison(on);
        self.i32s.set_poison(on);
        self.i64s.set_poison(on);
    }

    /// Allocation counters of the f32 pool.
    pub fn pool_stats(&self) -> PoolStats {
        self.f32s.stats()
    }
}
