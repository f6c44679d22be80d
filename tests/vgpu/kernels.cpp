// Every kernel of kernels/*.cu compiled for the host, and the launcher that runs one from the
// driver's `void** params`: the arguments are unpacked by the kernel's own C++ signature, each
// pointer is checked against the live allocations of the current context (a const pointee is a
// read, any other a write, for the stream-order checks), and after the launch every written
// allocation's slack is checked for writes past its ends.
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "cuda_host.h"
#include "vgpu.h"

#include "kernel_sources.inc"  // generated: one #include per kernels/*.cu

namespace vgpu {

void run_block(Dim3 block_index, void (*body)(const void*), const void* arg);

namespace {

template <class F, class Tuple>
struct Call {
  F f;
  Tuple args;
  static void run(const void* self) {
    const Call* c = static_cast<const Call*>(self);
    std::apply(c->f, c->args);
  }
};

template <class T>
void check_arg(T v, size_t i, const char* name, Stream* s, Allocation** written) {
  if constexpr (std::is_pointer_v<T>) {
    using P = std::remove_pointer_t<T>;
    if (v == nullptr) return;
    char what[160];
    snprintf(what, sizeof what, "kernel `%s` argument %zu", name, i);
    if constexpr (!std::is_void_v<P>)
      if (uintptr_t(v) % alignof(P))
        fail("misaligned pointer", "%s: %p is not aligned to %zu bytes", what, (const void*)v, alignof(P));
    Access a = std::is_const_v<P> ? Access::Read : Access::Write;
    Allocation* al = access(s, v, 0, a, what);
    written[i] = a == Access::Write ? al : nullptr;
  } else {
    written[i] = nullptr;
  }
}

template <class... A, size_t... I>
int launch_with(void (*f)(A...), const char* name, const LaunchShape& sh, Stream* s, void** params,
                std::index_sequence<I...>) {
  if (sizeof...(A) > 0 && params == nullptr) return 1;  // CUDA_ERROR_INVALID_VALUE
  begin_op(s);
  using Args = std::tuple<std::remove_cv_t<A>...>;
  Call<void (*)(A...), Args> call{f, Args{*static_cast<std::remove_cv_t<A>*>(params[I])...}};
  Allocation* written[sizeof...(A) + 1] = {};
  (check_arg(std::get<I>(call.args), I, name, s, written), ...);
  const Dim3 grid{sh.grid[0], sh.grid[1], sh.grid[2]};
  const Dim3 block{sh.block[0], sh.block[1], sh.block[2]};
  const size_t blocks = size_t(grid.x) * grid.y * grid.z;
  parallel(blocks, [&](size_t b) {
    vgpu_dev::grid_dim = grid;
    vgpu_dev::block_dim = block;
    Dim3 idx{unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (size_t(grid.x) * grid.y))};
    run_block(idx, &decltype(call)::run, &call);
  });
  for (size_t i = 0; i < sizeof...(A); ++i)
    if (written[i]) check_slack(written[i], name);
  return 0;
}

template <class... A>
int launch_kernel(void (*f)(A...), const char* name, const LaunchShape& sh, Stream* s, void** params) {
  return launch_with(f, name, sh, s, params, std::index_sequence_for<A...>{});
}

}  // namespace

struct Kernel {
  const char* name;
  int (*launch)(const LaunchShape&, Stream*, void**);
};

#define VGPU_KERNEL(k) \
  {#k, [](const LaunchShape& sh, Stream* s, void** p) { return launch_kernel(&::k, #k, sh, s, p); }},
static const Kernel kKernels[] = {
#include "kernel_table.inc"  // generated: VGPU_KERNEL(name) for every extern "C" kernel
};

const Kernel* find_kernel(const char* name) {
  for (const Kernel& k : kKernels)
    if (strcmp(k.name, name) == 0) return &k;
  return nullptr;
}

const char* kernel_name(const Kernel* k) { return k->name; }

int launch(const Kernel* k, const LaunchShape& shape, Stream* s, void** params) {
  return k->launch(shape, s, params);
}

}  // namespace vgpu
