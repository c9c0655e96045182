//! Picking the burn device (and so the backend) at run time.

use burn::tensor::Device;
use core::fmt;
use core::str::FromStr;

/// The environment variable that overrides [`device()`]'s choice.
pub const BACKEND_ENV: &str = "POSTTRAIN_BACKEND";

/// A burn backend this crate can run on (each behind the cargo feature of the
/// same name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendKind {
    /// Pure-Rust CPU backend (`ndarray` feature, the default).
    NdArray,
    /// GPU through wgpu (`wgpu`, `vulkan` or `metal` feature; the latter two
    /// pin the graphics API).
    Wgpu,
    /// libtorch through `tch` (`tch` feature).
    Tch,
}

impl BackendKind {
    /// Every kind, in the order [`device()`] prefers them.
    pub const ALL: [BackendKind; 3] = [BackendKind::Tch, BackendKind::Wgpu, BackendKind::NdArray];

    /// The name `POSTTRAIN_BACKEND` uses: `ndarray`, `wgpu`, `tch`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::NdArray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Tch => "tch",
        }
    }

    /// Whether this backend was compiled in (its cargo feature is on).
    pub fn is_compiled(self) -> bool {
        match self {
            BackendKind::NdArray => cfg!(feature = "ndarray"),
            BackendKind::Wgpu => cfg!(any(feature = "wgpu", feature = "vulkan", feature = "metal")),
            BackendKind::Tch => cfg!(feature = "tch"),
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = DeviceError;
    /// Parses `ndarray`, `wgpu` or `tch` (case-insensitive; `vulkan` and
    /// `metal` are accepted as `wgpu`, `libtorch` as `tch`).
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "ndarray" => Ok(BackendKind::NdArray),
            "wgpu" | "vulkan" | "metal" => Ok(BackendKind::Wgpu),
            "tch" | "libtorch" => Ok(BackendKind::Tch),
            _ => Err(DeviceError::UnknownBackend(s.to_string())),
        }
    }
}

/// Why no device could be chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceError {
    /// `POSTTRAIN_BACKEND` names no backend this crate knows.
    UnknownBackend(String),
    /// The backend is known but its cargo feature is off.
    NotCompiled(BackendKind),
    /// No backend feature is enabled at all.
    NoBackend,
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceError::UnknownBackend(s) => write!(
                f,
                "unknown backend {s:?} in {BACKEND_ENV} (expected one of: ndarray, wgpu, tch)"
            ),
            DeviceError::NotCompiled(k) => write!(
                f,
                "backend {k} is not compiled in: enable the posttrain-burn feature `{k}`"
            ),
            DeviceError::NoBackend => f.write_str(
                "no burn backend compiled in: enable one of the features ndarray, wgpu, vulkan, metal, tch",
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

/// The backends compiled into this build, in [`device()`]'s order of preference.
pub fn compiled_backends() -> Vec<BackendKind> {
    BackendKind::ALL
        .into_iter()
        .filter(|k| k.is_compiled())
        .collect()
}

/// The default device of `kind`.
///
/// `Wgpu` is the default adapter (`DeviceKind::DefaultDevice`), pinned to
/// Vulkan or Metal when only the `vulkan` or `metal` feature is on; `Tch` is
/// libtorch's CPU device; `NdArray` the CPU.
///
/// # Errors
///
/// [`DeviceError::NotCompiled`] when `kind`'s feature is off.
#[allow(deprecated, unreachable_code)] // burn 0.22 deprecates the ndarray and tch devices
pub fn device_for(kind: BackendKind) -> Result<Device, DeviceError> {
    match kind {
        BackendKind::NdArray => {
            #[cfg(feature = "ndarray")]
            return Ok(Device::ndarray());
        }
        BackendKind::Wgpu => {
            #[cfg(feature = "wgpu")]
            return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(feature = "vulkan")]
            return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice));
            #[cfg(feature = "metal")]
            return Ok(Device::metal(burn::tensor::DeviceKind::DefaultDevice));
        }
        BackendKind::Tch => {
            #[cfg(feature = "tch")]
            return Ok(Device::libtorch());
        }
    }
    Err(DeviceError::NotCompiled(kind))
}

/// The device posttrain's tensors should live on.
///
/// Without `POSTTRAIN_BACKEND`, the most capable backend compiled in: tch,
/// then wgpu (or vulkan/metal), then ndarray. With
/// `POSTTRAIN_BACKEND=ndarray|wgpu|tch`, that backend.
///
/// For burn's autodiff, wrap the result: `device()?.autodiff()` (feature
/// `autodiff`).
///
/// # Errors
///
/// [`DeviceError::UnknownBackend`] for an unknown name in
/// `POSTTRAIN_BACKEND`, [`DeviceError::NotCompiled`] for a backend whose
/// feature is off, [`DeviceError::NoBackend`] when no backend feature is on.
///
/// # Example
///
/// ```
/// let dev = posttrain_burn::device()?;
/// let t = posttrain_burn::tensor1(&[1.0, 2.0], &dev);
/// assert_eq!(posttrain_burn::to_vec(t), vec![1.0, 2.0]);
/// # Ok::<(), posttrain_burn::DeviceError>(())
/// ```
pub fn device() -> Result<Device, DeviceError> {
    match std::env::var(BACKEND_ENV) {
        Ok(name) if !name.trim().is_empty() => device_for(name.parse()?),
        _ => match compiled_backends().first() {
            Some(&k) => device_for(k),
            None => Err(DeviceError::NoBackend),
        },
    }
}
