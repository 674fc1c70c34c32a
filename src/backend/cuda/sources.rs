//! The kernel sources (`cuda/*.cu`, compiled into the binary) and the NVRTC options they are
//! built with. The engine and the CI compile test use exactly these.

use super::nvrtc::Target;

/// Helpers prepended to every module.
pub const COMMON: &str = include_str!("../../../cuda/common.cuh");

/// (module name, source). One NVRTC program per module, so a compile error names its file.
pub const MODULES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../../../cuda/elementwise.cu")),
    ("batch_norm", include_str!("../../../cuda/batch_norm.cu")),
    ("conv", include_str!("../../../cuda/conv.cu")),
    ("pool", include_str!("../../../cuda/pool.cu")),
    ("loss", include_str!("../../../cuda/loss.cu")),
    ("rep_conv", include_str!("../../../cuda/rep_conv.cu")),
    (
        "rep_conv_1x1",
        include_str!("../../../cuda/rep_conv_1x1.cu"),
    ),
    ("dfc", include_str!("../../../cuda/dfc.cu")),
    ("channel", include_str!("../../../cuda/channel.cu")),
    ("optim", include_str!("../../../cuda/optim.cu")),
];

/// The full program text of a module: the common helpers, then the module (its line numbers
/// restart at 1 so NVRTC's messages point into the .cu file).
pub fn program(module: &str) -> Option<String> {
    let (_, src) = MODULES.iter().find(|(m, _)| *m == module)?;
    Some(format!("{COMMON}\n#line 1 \"{module}.cu\"\n{src}"))
}

/// NVRTC options besides the architecture. IEEE division and square root (NVRTC's defaults,
/// spelled out) keep results close to the CPU backend; no fast math.
pub fn options(_target: Target) -> Vec<String> {
    [
        "--std=c++17",
        "-lineinfo",
        "--prec-div=true",
        "--prec-sqrt=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The kind of a kernel parameter, as launchers pass it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    I32,
    I64,
    F32,
    F64,
    Ptr,
    Lamb,
}

/// How a kernel uses a parameter, for the traffic count (`backend::trace`): `const T*` is
/// read, `T*` written, and `T* /*inout*/` both (read-modify-write, as an in-place add).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    /// Not a pointer.
    Value,
}

/// The parameter list of kernel `name` in `src`, macros such as REP_ARGS expanded.
fn param_list(src: &str, name: &str) -> Option<Vec<String>> {
    let start =
        src.find(&format!("__global__ void {name}("))? + "__global__ void ".len() + name.len() + 1;
    let body = &src[start..];
    let list = &body[..body.find(')')?];
    let list = list.replace(
        "REP_ARGS",
        "int N, int C, int H, int W, int Ho, int Wo, int kh, int kw, int s, int ph, int pw, int NB, int has_scale, int has_id",
    );
    Some(list.split(',').map(|p| p.trim().to_string()).collect())
}

/// How kernel `name` uses each of its parameters (see [`Access`]).
pub fn kernel_access(src: &str, name: &str) -> Option<Vec<Access>> {
    Some(
        param_list(src, name)?
            .iter()
            .map(|p| {
                if !p.contains('*') {
                    Access::Value
                } else if p.starts_with("const ") {
                    Access::Read
                } else if p.contains("/*inout*/") {
                    Access::ReadWrite
                } else {
                    Access::Write
                }
            })
            .collect(),
    )
}

/// The parameter kinds of kernel `name` in module source `src`, parsed from its
/// `__global__ void name(...)` declaration (macros such as REP_ARGS expanded). None when the
/// kernel is not there or a parameter type is unknown.
pub fn kernel_params(src: &str, name: &str) -> Option<Vec<ParamKind>> {
    param_list(src, name)?
        .iter()
        .map(|p| {
            if p.contains('*') {
                Some(ParamKind::Ptr)
            } else if p.starts_with("long long") {
                Some(ParamKind::I64)
            } else if p.starts_with("int ") {
                Some(ParamKind::I32)
            } else if p.starts_with("float ") {
                Some(ParamKind::F32)
            } else if p.starts_with("double ") {
                Some(ParamKind::F64)
            } else if p.starts_with("LambCoef ") {
                Some(ParamKind::Lamb)
            } else {
                None
            }
        })
        .collect()
}
