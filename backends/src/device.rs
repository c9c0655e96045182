//! Picking the burn device (and so the backend) at run time.
//!
//! | variable | values | effect |
//! |---|---|---|
//! | `POSTTRAIN_BACKEND` | `ndarray`, `wgpu`, `tch` | the backend [`device()`] returns (else the `test-*` feature's, else the most capable compiled in) |
//! | `POSTTRAIN_TCH_DEVICE` | `auto` (default), `cpu`, `cuda`, `cuda:N` | which libtorch device the `tch` backend uses: `auto` = CUDA 0 when libtorch sees a GPU, else the CPU |
//!
//! An unknown name, a backend whose feature is off, or `cuda` without a GPU
//! is a [`DeviceError`], never a panic or a silent fallback.

use burn::tensor::Device;
use core::fmt;
use core::str::FromStr;

/// The environment variable that overrides [`device()`]'s choice of backend.
pub const BACKEND_ENV: &str = "POSTTRAIN_BACKEND";

/// The environment variable that picks the libtorch device: `auto` (the
/// default: CUDA 0 when libtorch sees a GPU, else the CPU), `cpu`, `cuda`
/// (CUDA 0) or `cuda:N`.
pub const TCH_DEVICE_ENV: &str = "POSTTRAIN_TCH_DEVICE";

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

    /// The backend a `test-*` cargo feature asks the tests to run on
    /// (`test-tch`, then `test-wgpu`, then `test-ndarray`, when several are
    /// on); `None` without one. [`device()`] follows it when
    /// `POSTTRAIN_BACKEND` is unset, so one test body runs on every backend,
    /// picked by cargo feature.
    pub fn under_test() -> Option<BackendKind> {
        if cfg!(feature = "test-tch") {
            Some(BackendKind::Tch)
        } else if cfg!(feature = "test-wgpu") {
            Some(BackendKind::Wgpu)
        } else if cfg!(feature = "test-ndarray") {
            Some(BackendKind::NdArray)
        } else {
            None
        }
    }

    /// The backend a device belongs to (an autodiff device: the backend it
    /// wraps); `None` for a device of a backend this crate does not drive.
    ///
    /// burn 0.22 exposes the backend only through the device's dispatch
    /// enum, whose variants depend on burn's features; this reads its `Debug`
    /// form (`NdArray(..)`, `Cube(..)` = wgpu, `LibTorch(..)`).
    pub fn of(device: &Device) -> Option<BackendKind> {
        let s = format!("{device:?}");
        if s.contains("LibTorch(") {
            Some(BackendKind::Tch)
        } else if s.contains("NdArray(") {
            Some(BackendKind::NdArray)
        } else if s.contains("Cube(") {
            Some(BackendKind::Wgpu)
        } else {
            None
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
    /// `POSTTRAIN_TCH_DEVICE` is not `auto`, `cpu`, `cuda` or `cuda:N`.
    UnknownTchDevice(String),
    /// A CUDA device was asked for (`POSTTRAIN_TCH_DEVICE=cuda[:N]`) but
    /// libtorch sees fewer GPUs (`available`; 0 for a CPU-only libtorch or a
    /// machine without a GPU).
    NoCuda {
        /// The CUDA index asked for.
        index: usize,
        /// How many CUDA devices libtorch sees.
        available: usize,
    },
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
            DeviceError::UnknownTchDevice(s) => write!(
                f,
                "unknown libtorch device {s:?} in {TCH_DEVICE_ENV} (expected auto, cpu, cuda or cuda:N)"
            ),
            DeviceError::NoCuda { index, available } => write!(
                f,
                "{TCH_DEVICE_ENV} asks for CUDA device {index} but libtorch sees {available} CUDA device(s)"
            ),
        }
    }
}

impl std::error::Error for DeviceError {}

/// The libtorch device `POSTTRAIN_TCH_DEVICE` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TchDevice {
    /// CUDA 0 when libtorch sees a GPU, else the CPU (the default).
    Auto,
    /// libtorch's CPU device.
    Cpu,
    /// The CUDA device of this index.
    Cuda(usize),
}

impl FromStr for TchDevice {
    type Err = DeviceError;
    /// Parses `auto`, `cpu`, `cuda` (= `cuda:0`) or `cuda:N`
    /// (case-insensitive).
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "" | "auto" => Ok(TchDevice::Auto),
            "cpu" => Ok(TchDevice::Cpu),
            "cuda" | "gpu" => Ok(TchDevice::Cuda(0)),
            _ => l
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(TchDevice::Cuda)
                .ok_or_else(|| DeviceError::UnknownTchDevice(s.to_string())),
        }
    }
}

impl TchDevice {
    /// The choice in `POSTTRAIN_TCH_DEVICE` (unset or empty: [`TchDevice::Auto`]).
    ///
    /// # Errors
    ///
    /// [`DeviceError::UnknownTchDevice`] for a value that does not parse.
    pub fn from_env() -> Result<Self, DeviceError> {
        match std::env::var(TCH_DEVICE_ENV) {
            Ok(v) => v.parse(),
            Err(_) => Ok(TchDevice::Auto),
        }
    }
}

/// How many CUDA devices libtorch sees (0 without the `tch` feature, with a
/// CPU-only libtorch, or on a machine without a GPU).
pub fn tch_cuda_count() -> usize {
    #[cfg(feature = "tch")]
    {
        Device::enumerate(burn::tensor::DeviceType::LibTorch)
            .into_vec()
            .len()
    }
    #[cfg(not(feature = "tch"))]
    {
        0
    }
}

/// The backends compiled into this build, in [`device()`]'s order of preference.
pub fn compiled_backends() -> Vec<BackendKind> {
    BackendKind::ALL
        .into_iter()
        .filter(|k| k.is_compiled())
        .collect()
}

/// The default device of `kind`.
///
/// `Wgpu` is the default adapter (`DeviceKind::DefaultDevice`; on a machine
/// without a GPU, a software Vulkan such as Mesa's lavapipe), pinned to
/// Vulkan or Metal when only the `vulkan` or `metal` feature is on. `Tch` is
/// the libtorch device `POSTTRAIN_TCH_DEVICE` asks for (see [`TchDevice`]):
/// by default CUDA 0 when libtorch sees a GPU, else the CPU. `NdArray` is
/// the CPU.
///
/// # Errors
///
/// [`DeviceError::NotCompiled`] when `kind`'s feature is off; for `Tch`,
/// [`DeviceError::UnknownTchDevice`] and [`DeviceError::NoCuda`].
pub fn device_for(kind: BackendKind) -> Result<Device, DeviceError> {
    match kind {
        BackendKind::Tch => tch_device(TchDevice::from_env()?),
        _ => default_device(kind),
    }
}

#[allow(deprecated, unreachable_code)] // burn 0.22 deprecates the ndarray and tch devices
fn default_device(kind: BackendKind) -> Result<Device, DeviceError> {
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

/// The libtorch device `which` names.
///
/// # Errors
///
/// [`DeviceError::NotCompiled`] without the `tch` feature;
/// [`DeviceError::NoCuda`] for a CUDA index libtorch does not see.
#[allow(deprecated)] // burn 0.22 deprecates the tch devices
pub fn tch_device(which: TchDevice) -> Result<Device, DeviceError> {
    if !BackendKind::Tch.is_compiled() {
        return Err(DeviceError::NotCompiled(BackendKind::Tch));
    }
    let available = tch_cuda_count();
    let index = match which {
        TchDevice::Cpu => return default_device(BackendKind::Tch),
        TchDevice::Auto if available == 0 => return default_device(BackendKind::Tch),
        TchDevice::Auto => 0,
        TchDevice::Cuda(i) if i >= available => {
            return Err(DeviceError::NoCuda {
                index: i,
                available,
            })
        }
        TchDevice::Cuda(i) => i,
    };
    #[cfg(feature = "tch")]
    return Ok(Device::libtorch_cuda(index));
    #[cfg(not(feature = "tch"))]
    {
        let _ = index;
        Err(DeviceError::NotCompiled(BackendKind::Tch))
    }
}

/// The backend [`device()`] uses: `POSTTRAIN_BACKEND` when set, else the
/// `test-*` feature's ([`BackendKind::under_test`]), else the most capable
/// compiled in (tch, then wgpu, then ndarray).
///
/// # Errors
///
/// [`DeviceError::UnknownBackend`], [`DeviceError::NotCompiled`],
/// [`DeviceError::NoBackend`] as for [`device()`].
pub fn selected_backend() -> Result<BackendKind, DeviceError> {
    let kind = match std::env::var(BACKEND_ENV) {
        Ok(name) if !name.trim().is_empty() => name.parse()?,
        _ => match BackendKind::under_test().or_else(|| compiled_backends().first().copied()) {
            Some(k) => k,
            None => return Err(DeviceError::NoBackend),
        },
    };
    if kind.is_compiled() {
        Ok(kind)
    } else {
        Err(DeviceError::NotCompiled(kind))
    }
}

/// The device posttrain's tensors should live on.
///
/// The backend is [`selected_backend()`]: `POSTTRAIN_BACKEND=ndarray|wgpu|tch`
/// when set; else, in a build with a `test-*` feature (`test-ndarray`,
/// `test-wgpu`, `test-tch`), that feature's backend, so
/// `cargo test --features test-wgpu` tests wgpu; else the most capable
/// backend compiled in: tch, then wgpu (or vulkan/metal), then ndarray. The
/// device within the backend is [`device_for`]'s (for tch:
/// `POSTTRAIN_TCH_DEVICE`, CUDA when libtorch sees a GPU, else the CPU).
///
/// For burn's autodiff, wrap the result: `device()?.autodiff()` (feature
/// `autodiff`).
///
/// # Errors
///
/// [`DeviceError::UnknownBackend`] for an unknown name in
/// `POSTTRAIN_BACKEND`, [`DeviceError::NotCompiled`] for a backend whose
/// feature is off, [`DeviceError::NoBackend`] when no backend feature is on;
/// for tch, [`DeviceError::UnknownTchDevice`] / [`DeviceError::NoCuda`].
///
/// # Example
///
/// ```
/// let dev = posttrain_burn::device()?;
/// let t = posttrain_burn::tensor1(&[1.0, 2.0], &dev);
/// assert_eq!(posttrain_burn::to_vec(t), vec![1.0, 2.0]);
/// assert_eq!(
///     posttrain_burn::BackendKind::of(&dev),
///     Some(posttrain_burn::selected_backend()?)
/// );
/// # Ok::<(), posttrain_burn::DeviceError>(())
/// ```
pub fn device() -> Result<Device, DeviceError> {
    device_for(selected_backend()?)
}
