// The virtual CUDA device: state shared by its driver, cuBLAS and cuDNN parts.
//
// Work runs synchronously on the host when it is enqueued, so results never depend on timing; what
// a real GPU may run concurrently is tracked instead with vector clocks (one component per stream
// and one for the host). Every device access is checked against the allocation it lands in: live,
// of the current context, in bounds, and ordered after the allocation, its last write and (for a
// write or a free) every read since, whatever order the host happened to run things in.
#pragma once
#include <stddef.h>
#include <stdint.h>

#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace vgpu {

// Prints `vgpu: <kind>: <message>` and aborts: a report of a bug in the program under test.
[[noreturn]] void fail(const char* kind, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// One lock for the whole device: calls are serialized, as the work runs when enqueued.
std::recursive_mutex& lock();

struct Clock {
  std::vector<uint64_t> t;
  uint64_t at(uint32_t actor) const { return actor < t.size() ? t[actor] : 0; }
  void join(const Clock& o);
};

// A point in one actor's history: actor 0 is the host, every stream another.
struct Epoch {
  uint32_t actor = 0;
  uint64_t t = 0;
  bool before(const Clock& c) const { return c.at(actor) >= t; }
};

struct Context;

struct Stream {
  Context* ctx = nullptr;
  uint32_t actor = 0;
  bool legacy = false;    // the context's null stream
  bool blocking = false;  // created without CU_STREAM_NON_BLOCKING: ordered with the null stream
  uint64_t capture = 0;   // the id of the capture this stream is in, or 0
  Clock clock;
  std::string name() const;
};

enum class Access { Read, Write };

struct Allocation {
  uintptr_t base = 0;
  size_t size = 0;
  Context* ctx = nullptr;
  bool host = false;  // page-locked host memory: no ordering tracked
  bool freed = false;
  Epoch born, write, died;
  std::map<uint32_t, uint64_t> reads;  // per actor, the latest read since the last write
  // The mapping: guard page, slack before `base`, the bytes, slack after, guard page.
  uintptr_t map_base = 0;
  size_t map_size = 0;
  std::string describe() const;
};

struct Context {
  int device = 0;
  bool primary = false;
  bool destroyed = false;
  Stream* null_stream = nullptr;
  std::vector<Stream*> streams;  // live streams, null stream first
};

// The current context of the calling thread, or null.
Context* current();
// Number of devices (VGPU_DEVICES, default 1), and a device's primary context (made on first use;
// null for a device that does not exist). Call with the lock held.
int device_count();
Context* primary_context(int device);
// The stream a handle names in context `ctx` (null: the context's null stream).
Stream* stream(void* handle, Context* ctx);
// Starts one operation on `s`: orders it after what the host and (by the legacy stream's rules)
// other streams did before, and returns its epoch.
Epoch begin_op(Stream* s);
// The host waits for `c` (synchronize calls).
void host_join(const Clock& c);

// Stream capture (CUDA graphs). An operation enqueued on a capturing stream does not run: it is
// kept, with its arguments as they were at the call, and runs on the launching stream at every
// cuGraphLaunch of the graph made from the capture, in capture order. `captured` keeps `op` and
// returns true when `s` is capturing; otherwise it returns false and the caller runs `op` now.
// An op returns 0 or the error its call would have returned.
using Op = std::function<int(Stream*)>;
bool captured(Stream* s, Op op);
// Reports (`vgpu: stream capture:`) a call that is invalid on a capturing stream (`s`), or, with
// `s` null, a potentially unsafe call while a capture that prohibits it is active: what CUDA
// answers with an error and an invalidated capture, the device treats as the bug it is.
void no_capture(Stream* s, const char* what);

// Checks an access of [p, p + bytes) by the current operation on `s` and records it. `what`
// names the operation and operand in a report. Returns the allocation.
Allocation* access(Stream* s, const void* p, size_t bytes, Access a, const char* what);
// The live allocation of `ctx` that holds `p`, or null.
Allocation* find(const void* p);

// Reports a write past the ends of a written allocation (its slack lost its pattern).
void check_slack(const Allocation* a, const char* what);

// Fills `bytes` at `p` with a NaN pattern: a workspace whose old contents must not matter.
void scribble(void* p, size_t bytes);

// Runs f(i) for i in [0, n) on the device's worker threads.
void parallel_for(size_t n, void (*f)(size_t, void*), void* arg);
template <class F>
void parallel(size_t n, F&& f) {
  parallel_for(n, [](size_t i, void* a) { (*static_cast<F*>(a))(i); }, &f);
}

// The kernel registry (kernels.cpp): `launch` runs one, by the name the module gave it.
struct Kernel;
const Kernel* find_kernel(const char* name);
struct LaunchShape {
  unsigned grid[3], block[3];
  unsigned shared;
};
// Validates the arguments against the kernel's signature and runs it. Returns a CUresult.
int launch(const Kernel* k, const LaunchShape& shape, Stream* s, void** params);

// The launch audit. With VGPU_LAUNCH_LOG=<file>, every kernel launch is appended to the file as
// `launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <shared bytes>`, and library events (a cuBLAS
// handle made or destroyed) as `event <what>`. With VGPU_SKIP_COMPUTE=1 kernels and GEMMs are
// recorded but not run, so shapes far too large to emulate can be driven for their launches
// (their outputs then hold whatever the buffers held).
bool skip_compute();
void audit_launch(const char* kernel, const LaunchShape& shape);
void audit_event(const char* what);

// A deliberate fault from VGPU_MUTATE, to prove a test suite notices a wrong launch or GEMM:
// `swap:<kernel>` exchanges the first two pointer arguments with one pointee type (const or not)
// in every launch of that kernel; `transpose` flips op(A) of every cublasGemmEx. Read once; an
// unknown value, kernel or a kernel with no such pair is reported, so a typo is never a no-op.
struct Mutation {
  const Kernel* swap = nullptr;
  bool transpose = false;
};
const Mutation& mutation();
// Says on stderr, once per process, that a mutation changed a call: `vgpu: mutation active: ...`.
void mutation_applied(const char* what);

// Device properties of the virtual device.
constexpr int kSmCount = 132;
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxSharedPerBlock = 48 * 1024;
constexpr const char* kDeviceName = "barlow virtual CUDA device (host emulation)";

}  // namespace vgpu
