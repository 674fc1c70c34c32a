//! NVRTC, loaded at run time by path or by name (no CUDA toolkit at build time), the choice of
//! compilation target for a device, and the on-disk cache of compiled kernels.
//!
//! This is a small FFI of its own rather than cudarc's `nvrtc` module: cudarc loads one NVRTC
//! per process by name, while the CI check compiles every kernel with two NVRTC versions (CUDA
//! 13 for sm_80/sm_90, CUDA 12 for sm_70) from explicit paths.

use anyhow::{anyhow, bail, Context, Result};
use libloading::Library;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};

type Prog = *mut c_void;
type Res = c_int;

/// What NVRTC should produce for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code for `sm_XY` (the device's own architecture: no JIT at load time).
    Cubin(u32),
    /// PTX for `compute_XY`, JIT-compiled by the driver (the installed NVRTC does not know the
    /// device's architecture, e.g. a newer GPU than the NVRTC).
    Ptx(u32),
}

impl Target {
    /// The `--gpu-architecture` value.
    pub fn arch_flag(&self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }

    pub fn extension(&self) -> &'static str {
        match self {
            Target::Cubin(_) => "cubin",
            Target::Ptx(_) => "ptx",
        }
    }
}

/// The target for a device of compute capability `cc` (e.g. 90) given the architectures the
/// NVRTC supports: its own `sm_cc` when supported, else PTX for the newest supported
/// architecture below it (the driver JITs it), else none (the NVRTC is too new for the device,
/// as CUDA 13 is for Volta).
pub fn pick_target(cc: u32, supported: &[i32]) -> Option<Target> {
    if supported.iter().any(|&a| a as u32 == cc) {
        return Some(Target::Cubin(cc));
    }
    supported
        .iter()
        .map(|&a| a as u32)
        .filter(|&a| a < cc)
        .max()
        .map(Target::Ptx)
}

/// A loaded libnvrtc.
pub struct Nvrtc {
    lib: Library,
    path: String,
    version: (i32, i32),
}

/// Library names tried when no path is given (CUDA 13 first, as cudarc is built for it).
pub const DEFAULT_NAMES: &[&str] = &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];

/// Converts an NVRTC status into an error naming the call.
fn check(what: &str, r: Res) -> Result<()> {
    if r == 0 {
        Ok(())
    } else {
        bail!("{what} failed with NVRTC error {r}")
    }
}

impl Nvrtc {
    /// Loads libnvrtc from a path (or a bare name, searched by the dynamic loader).
    pub fn open(path: impl AsRef<Path>) -> Result<Nvrtc> {
        let p = path.as_ref();
        // SAFETY: loading libnvrtc runs no initialisers with preconditions we could violate.
        let lib = unsafe { Library::new(p) }
            .map_err(|e| anyhow!("cannot load NVRTC from {}: {e}", p.display()))?;
        let mut n = Nvrtc {
            lib,
            path: p.display().to_string(),
            version: (0, 0),
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: nvrtcVersion(int*, int*) writes two ints.
        unsafe {
            let f = n.sym::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> Res>("nvrtcVersion")?;
            check("nvrtcVersion", f(&mut major, &mut minor))?;
        }
        n.version = (major, minor);
        Ok(n)
    }

    /// `$GHOSTV3_NVRTC` if set, else the first of [`DEFAULT_NAMES`] the loader finds.
    pub fn open_default() -> Result<Nvrtc> {
        if let Some(p) = std::env::var_os("GHOSTV3_NVRTC") {
            return Nvrtc::open(PathBuf::from(p));
        }
        let mut errs = Vec::new();
        for name in DEFAULT_NAMES {
            match Nvrtc::open(name) {
                Ok(n) => return Ok(n),
                Err(e) => errs.push(e.to_string()),
            }
        }
        bail!(
            "NVRTC not found (tried {}; put the folder of libnvrtc.so.* on LD_LIBRARY_PATH or set GHOSTV3_NVRTC to its path)",
            DEFAULT_NAMES.join(", ")
        )
    }

    unsafe fn sym<F: Copy>(&self, name: &str) -> Result<F> {
        let s = self
            .lib
            .get::<F>(name.as_bytes())
            .with_context(|| format!("{} has no symbol {name}", self.path))?;
        Ok(*s)
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// (major, minor), e.g. (13, 0).
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// The architectures this NVRTC compiles for, e.g. [75, 80, 86, 87, 89, 90, ...].
    pub fn supported_archs(&self) -> Result<Vec<i32>> {
        let mut n: c_int = 0;
        // SAFETY: the first call writes the count, the second fills a buffer of that length.
        unsafe {
            let num =
                self.sym::<unsafe extern "C" fn(*mut c_int) -> Res>("nvrtcGetNumSupportedArchs")?;
            check("nvrtcGetNumSupportedArchs", num(&mut n))?;
            let mut v = vec![0 as c_int; n.max(0) as usize];
            let get =
                self.sym::<unsafe extern "C" fn(*mut c_int) -> Res>("nvrtcGetSupportedArchs")?;
            check("nvrtcGetSupportedArchs", get(v.as_mut_ptr()))?;
            Ok(v)
        }
    }

    /// Compiles one source for `target`; the error carries NVRTC's log.
    pub fn compile(
        &self,
        name: &str,
        src: &str,
        target: Target,
        extra: &[String],
    ) -> Result<Vec<u8>> {
        type Create = unsafe extern "C" fn(
            *mut Prog,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> Res;
        type Compile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> Res;
        type Size = unsafe extern "C" fn(Prog, *mut usize) -> Res;
        type Get = unsafe extern "C" fn(Prog, *mut c_char) -> Res;
        type Destroy = unsafe extern "C" fn(*mut Prog) -> Res;
        let csrc = CString::new(src).context("kernel source contains a NUL byte")?;
        let cname = CString::new(name)?;
        let mut opts: Vec<CString> = vec![CString::new(format!(
            "--gpu-architecture={}",
            target.arch_flag()
        ))?];
        for o in extra {
            opts.push(CString::new(o.as_str())?);
        }
        let optp: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
        // SAFETY: every pointer handed to NVRTC outlives the calls; buffers have the sizes
        // NVRTC reported; the program is destroyed on every path after creation.
        unsafe {
            let create = self.sym::<Create>("nvrtcCreateProgram")?;
            let compile = self.sym::<Compile>("nvrtcCompileProgram")?;
            let log_size = self.sym::<Size>("nvrtcGetProgramLogSize")?;
            let get_log = self.sym::<Get>("nvrtcGetProgramLog")?;
            let destroy = self.sym::<Destroy>("nvrtcDestroyProgram")?;
            let (size_fn, get_fn) = match target {
                Target::Cubin(_) => ("nvrtcGetCUBINSize", "nvrtcGetCUBIN"),
                Target::Ptx(_) => ("nvrtcGetPTXSize", "nvrtcGetPTX"),
            };
            let out_size = self.sym::<Size>(size_fn)?;
            let get_out = self.sym::<Get>(get_fn)?;
            let mut prog: Prog = std::ptr::null_mut();
            check(
                "nvrtcCreateProgram",
                create(
                    &mut prog,
                    csrc.as_ptr(),
                    cname.as_ptr(),
                    0,
                    std::ptr::null(),
                    std::ptr::null(),
                ),
            )?;
            let r = compile(prog, optp.len() as c_int, optp.as_ptr());
            let mut n = 0usize;
            let mut log = String::new();
            if log_size(prog, &mut n) == 0 && n > 1 {
                let mut buf = vec![0u8; n];
                if get_log(prog, buf.as_mut_ptr() as *mut c_char) == 0 {
                    log = String::from_utf8_lossy(&buf[..n - 1]).into_owned();
                }
            }
            let result = if r != 0 {
                Err(anyhow!(
                    "NVRTC {}.{} could not compile {name} for {}:\n{log}",
                    self.version.0,
                    self.version.1,
                    target.arch_flag()
                ))
            } else {
                let mut n = 0usize;
                check(size_fn, out_size(prog, &mut n)).and_then(|_| {
                    let mut out = vec![0u8; n];
                    check(get_fn, get_out(prog, out.as_mut_ptr() as *mut c_char)).map(|_| out)
                })
            };
            destroy(&mut prog);
            result
        }
    }
}

/// FNV-1a over byte strings: a hash that is the same on every build (std's is not).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `$GHOSTV3_CACHE_DIR`, else `$XDG_CACHE_HOME/ghostv3`, else `~/.cache/ghostv3`; kernels go
/// in its `kernels/` folder.
pub fn cache_dir() -> Option<PathBuf> {
    let base = if let Some(d) = std::env::var_os("GHOSTV3_CACHE_DIR") {
        PathBuf::from(d)
    } else if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        PathBuf::from(d).join("ghostv3")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("ghostv3")
    };
    Some(base.join("kernels"))
}

/// Compiles `src` for `target`, reusing a cached result keyed by the source, the options, the
/// target and the NVRTC version. Returns the image and whether it came from the cache. A cache
/// that cannot be read or written is skipped (compiling is always possible).
pub fn compile_cached(
    nvrtc: &Nvrtc,
    name: &str,
    src: &str,
    target: Target,
    extra: &[String],
) -> Result<(Vec<u8>, bool)> {
    let ver = format!("{}.{}", nvrtc.version.0, nvrtc.version.1);
    let opts = extra.join(" ");
    let arch = target.arch_flag();
    let key = fnv1a(&[
        src.as_bytes(),
        opts.as_bytes(),
        arch.as_bytes(),
        ver.as_bytes(),
    ]);
    let file =
        cache_dir().map(|d| d.join(format!("{name}-{arch}-{key:016x}.{}", target.extension())));
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if !bytes.is_empty() {
                return Ok((bytes, true));
            }
        }
    }
    let out = nvrtc.compile(name, src, target, extra)?;
    if let Some(f) = &file {
        // Temp file + rename: a concurrent reader never sees half a file.
        if let Some(dir) = f.parent() {
            if std::fs::create_dir_all(dir).is_ok() {
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                if std::fs::write(&tmp, &out).is_ok() && std::fs::rename(&tmp, f).is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
        }
    }
    Ok((out, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_choice() {
        let cuda13 = [75, 80, 86, 87, 89, 90, 100, 103, 120];
        assert_eq!(pick_target(90, &cuda13), Some(Target::Cubin(90)));
        // A device newer than the NVRTC: PTX of the newest older arch, JIT by the driver.
        assert_eq!(pick_target(121, &cuda13), Some(Target::Ptx(120)));
        // Volta with CUDA 13: nothing fits.
        assert_eq!(pick_target(70, &cuda13), None);
        assert_eq!(
            pick_target(70, &[50, 60, 70, 75, 80, 90]),
            Some(Target::Cubin(70))
        );
        assert_eq!(Target::Ptx(86).arch_flag(), "compute_86");
    }

    #[test]
    fn hash_is_stable_and_separates_parts() {
        assert_eq!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"ab", b"c"]));
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
