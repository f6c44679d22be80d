//! Typed kernel launches. Each kernel's signature is written once in Rust with [`kernels!`]
//! (beside the operations that use it), which generates a launcher taking device buffers typed by
//! element and mutability. The declared parameter list is checked at compile time against the
//! one `build.rs` read from the kernel's source: the name must exist in the module, the parameter
//! count and every C type must agree, for every element type a launcher is instantiated with.
//!
//! Parameter forms in a declaration:
//! - `x: &T` — a `const T*`; any [`DevicePtr<T>`](cudarc::driver::DevicePtr) (slice or view).
//! - `y: &mut T` — a `T*`; any [`DevicePtrMut<T>`](cudarc::driver::DevicePtrMut).
//! - `r: Option<&T>` / `r: Option<&mut T>` — a pointer that may be null, as a view.
//! - `n: i64` — a value.
//!
//! Buffers are passed as cudarc slices or views, never addresses: the launcher checks each one
//! lives in the stream's context and holds its access guard across the launch, so cudarc's event
//! tracking orders the kernel against other streams. Lengths are the caller's to check, which is
//! why launchers are `unsafe`.

use super::fatbin::Module;

/// The C name of a type a kernel parameter is built from. (Public but unreachable from outside
/// the crate, so it can bound the public element traits.)
pub trait CType {
    /// How the kernel sources spell it.
    const C: &'static str;
}

macro_rules! c_types {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CType for $t { const C: &'static str = $c; })*
    };
}
c_types! {
    f32 => "float",
    f64 => "double",
    i32 => "int",
    i64 => "int64_t",
    u8 => "uint8_t",
    half::bf16 => "__nv_bfloat16",
    half::f16 => "__half",
}

/// One declared parameter, with its base C type.
#[derive(Clone, Copy)]
pub(crate) enum Param {
    /// `const T*`
    In(&'static str),
    /// `T*`
    Out(&'static str),
    /// `T`
    Value(&'static str),
}

const fn eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `source` (`prefix ++ base ++ suffix`) is exactly that concatenation.
const fn spelled(source: &str, prefix: &str, base: &str, suffix: &str) -> bool {
    let (s, p, b, x) = (
        source.as_bytes(),
        prefix.as_bytes(),
        base.as_bytes(),
        suffix.as_bytes(),
    );
    if s.len() != p.len() + b.len() + x.len() {
        return false;
    }
    let (head, rest) = s.split_at(p.len());
    let (mid, tail) = rest.split_at(b.len());
    eq(head, p) && eq(mid, b) && eq(tail, x)
}

const fn param_matches(source: &str, p: Param) -> bool {
    match p {
        Param::In(base) => spelled(source, "const ", base, "*"),
        Param::Out(base) => spelled(source, "", base, "*"),
        Param::Value(base) => spelled(source, "", base, ""),
    }
}

/// Whether `module` defines `name` with exactly the parameters `params`. Evaluated at compile
/// time by every launcher [`kernels!`] generates.
pub(crate) const fn declared(module: &Module, name: &str, params: &[Param]) -> bool {
    let mut k = 0;
    while k < module.kernels.len() {
        let kernel = &module.kernels[k];
        if eq(kernel.name.as_bytes(), name.as_bytes()) {
            if kernel.params.len() != params.len() {
                return false;
            }
            let mut i = 0;
            while i < params.len() {
                if !param_matches(kernel.params[i], params[i]) {
                    return false;
                }
                i += 1;
            }
            return true;
        }
        k += 1;
    }
    false
}

/// Declares kernels of one module and generates a typed, `unsafe` launcher for each:
///
/// ```ignore
/// kernels! {
///     module: LOSS;
///     /// What it does.
///     fn standardize_fwd<T: Element, O: HatElement>(
///         z: &T, zhat: &mut O, stats: &mut f32, n: i64, d: i64, eps: f32, tf32: i32,
///     ) = std_fwd_name(T::DTYPE, O::HAT);
/// }
/// ```
///
/// The name after `=` must be a constant expression (it may use the type parameters). The
/// launcher is `fn(kernels, stream, cfg, args…) -> Result<()>`; its caller guarantees every
/// buffer is as long as the kernel indexes for `cfg` and the values passed.
macro_rules! kernels {
    (module: $module:expr; $(
        $(#[$meta:meta])*
        fn $f:ident $(<$($g:ident : $gb:path),+ $(,)?>)? ( $($params:tt)* ) = $name:expr;
    )*) => {$(
        $crate::cuda::launch::kernels!(@munch
            [$module] [$(#[$meta])*] $f [$($($g : $gb),+)?] [$name] (stream builder)
            [] [] [] []
            $($params)*
        );
    )*};

    // `p: Option<&mut T>`
    (@munch $m:tt $meta:tt $f:ident $g:tt $k:tt ($s:ident $b:ident)
        [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
        $p:ident : Option<&mut $t:ty> $(, $($rest:tt)*)?
    ) => {
        $crate::cuda::launch::kernels!(@munch $m $meta $f $g $k ($s $b)
            [$($sig)* $p: Option<&mut cudarc::driver::CudaViewMut<'_, $t>>,]
            [$($set)*
                let ($p, _guard) = match $p {
                    Some(v) => {
                        $crate::cuda::check_context(stringify!($p), v, $s)?;
                        let (ptr, guard) = cudarc::driver::DevicePtrMut::device_ptr_mut(v, $s);
                        (ptr, Some(guard))
                    }
                    None => (0u64, None),
                };
            ]
            [$($push)* $b.arg(&$p);]
            [$($chk)* $crate::cuda::launch::Param::Out(<$t as $crate::cuda::launch::CType>::C),]
            $($($rest)*)?
        );
    };
    // `p: Option<&T>`
    (@munch $m:tt $meta:tt $f:ident $g:tt $k:tt ($s:ident $b:ident)
        [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
        $p:ident : Option<&$t:ty> $(, $($rest:tt)*)?
    ) => {
        $crate::cuda::launch::kernels!(@munch $m $meta $f $g $k ($s $b)
            [$($sig)* $p: Option<&cudarc::driver::CudaView<'_, $t>>,]
            [$($set)*
                let ($p, _guard) = match $p {
                    Some(v) => {
                        $crate::cuda::check_context(stringify!($p), v, $s)?;
                        let (ptr, guard) = cudarc::driver::DevicePtr::device_ptr(v, $s);
                        (ptr, Some(guard))
                    }
                    None => (0u64, None),
                };
            ]
            [$($push)* $b.arg(&$p);]
            [$($chk)* $crate::cuda::launch::Param::In(<$t as $crate::cuda::launch::CType>::C),]
            $($($rest)*)?
        );
    };
    // `p: &mut T`
    (@munch $m:tt $meta:tt $f:ident $g:tt $k:tt ($s:ident $b:ident)
        [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
        $p:ident : &mut $t:ty $(, $($rest:tt)*)?
    ) => {
        $crate::cuda::launch::kernels!(@munch $m $meta $f $g $k ($s $b)
            [$($sig)* $p: &mut impl cudarc::driver::DevicePtrMut<$t>,]
            [$($set)*
                $crate::cuda::check_context(stringify!($p), $p, $s)?;
                let ($p, _guard) = cudarc::driver::DevicePtrMut::device_ptr_mut($p, $s);
            ]
            [$($push)* $b.arg(&$p);]
            [$($chk)* $crate::cuda::launch::Param::Out(<$t as $crate::cuda::launch::CType>::C),]
            $($($rest)*)?
        );
    };
    // `p: &T`
    (@munch $m:tt $meta:tt $f:ident $g:tt $k:tt ($s:ident $b:ident)
        [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
        $p:ident : &$t:ty $(, $($rest:tt)*)?
    ) => {
        $crate::cuda::launch::kernels!(@munch $m $meta $f $g $k ($s $b)
            [$($sig)* $p: &impl cudarc::driver::DevicePtr<$t>,]
            [$($set)*
                $crate::cuda::check_context(stringify!($p), $p, $s)?;
                let ($p, _guard) = cudarc::driver::DevicePtr::device_ptr($p, $s);
            ]
            [$($push)* $b.arg(&$p);]
            [$($chk)* $crate::cuda::launch::Param::In(<$t as $crate::cuda::launch::CType>::C),]
            $($($rest)*)?
        );
    };
    // `p: T` (a value)
    (@munch $m:tt $meta:tt $f:ident $g:tt $k:tt ($s:ident $b:ident)
        [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
        $p:ident : $t:ty $(, $($rest:tt)*)?
    ) => {
        $crate::cuda::launch::kernels!(@munch $m $meta $f $g $k ($s $b)
            [$($sig)* $p: $t,]
            [$($set)*]
            [$($push)* $b.arg(&$p);]
            [$($chk)* $crate::cuda::launch::Param::Value(<$t as $crate::cuda::launch::CType>::C),]
            $($($rest)*)?
        );
    };
    // Every parameter read: emit the launcher.
    (@munch [$module:expr] [$($meta:tt)*] $f:ident [$($g:ident : $gb:path),*] [$name:expr]
        ($s:ident $b:ident) [$($sig:tt)*] [$($set:tt)*] [$($push:tt)*] [$($chk:tt)*]
    ) => {
        $($meta)*
        ///
        /// # Safety
        /// Every buffer must hold as many elements as the kernel indexes for `cfg` and the
        /// values passed; a mutable buffer must not overlap any other argument unless the
        /// kernel says it may.
        #[allow(clippy::too_many_arguments, dead_code)]
        pub(crate) unsafe fn $f<$($g: $gb),*>(
            kernels: &$crate::cuda::module::Kernels,
            $s: &std::sync::Arc<cudarc::driver::CudaStream>,
            cfg: cudarc::driver::LaunchConfig,
            $($sig)*
        ) -> $crate::error::Result<()> {
            #[allow(unused_imports)]
            use cudarc::driver::PushKernelArg as _;
            let name: &'static str = const {
                let name = $name;
                assert!(
                    $crate::cuda::launch::declared(&$module, name, &[$($chk)*]),
                    concat!(
                        "kernel `", stringify!($f), "`: the declared parameters differ from the ",
                        "source's (or the kernel is not in the module)"
                    )
                );
                name
            };
            let function = kernels.get(name)?;
            $($set)*
            let mut $b = $s.launch_builder(function);
            $($push)*
            // SAFETY: the argument list matches the kernel's parameters in count and C type
            // (checked at compile time above); every buffer is in this stream's context; the
            // caller guarantees the lengths and aliasing this function's contract states.
            unsafe { $b.launch(cfg) }
                .map_err($crate::cuda::drv(format!("launching {name}")))?;
            Ok(())
        }
    };
}
pub(crate) use kernels;
