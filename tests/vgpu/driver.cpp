// The driver-API part of the virtual device: devices, contexts, streams, events, memory, modules
// and launches. Compiled against the real cuda.h, so every signature is the driver's own.
#include <cuda.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <thread>

#include "vgpu.h"

namespace vgpu {

void fail(const char* kind, const char* fmt, ...) {
  char msg[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nvgpu: %s: %s\n", kind, msg);
  fflush(stderr);
  abort();
}

std::recursive_mutex& lock() {
  static std::recursive_mutex m;
  return m;
}

void Clock::join(const Clock& o) {
  if (t.size() < o.t.size()) t.resize(o.t.size(), 0);
  for (size_t i = 0; i < o.t.size(); ++i) t[i] = std::max(t[i], o.t[i]);
}

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kAlign = 256;  // cudaMalloc's alignment
constexpr unsigned char kSlack = 0xA5;
constexpr unsigned char kFresh = 0xFF;  // NaN in f32, bf16 and f16

struct Device {
  Context* primary = nullptr;
  int primary_refs = 0;
  size_t used = 0, high = 0;
};

struct State {
  bool initialized = false;
  std::vector<Device> devices;
  size_t memory_limit = 0;
  uint32_t next_actor = 1;
  Clock host;
  std::map<uintptr_t, Allocation*> live;   // by base
  std::map<uintptr_t, Allocation*> freed;  // quarantined, for use-after-free reports
  std::deque<Allocation*> quarantine;
  size_t quarantined = 0;
  std::vector<Context*> contexts;
  // Captures in progress, by id (ids are never reused, so a stale one finds nothing).
  struct Capture {
    Context* ctx;
    Stream* stream;
    CUstreamCaptureMode mode;
    std::thread::id thread;
    std::vector<Op> ops;
  };
  std::map<uint64_t, Capture> captures;
  uint64_t next_capture = 1;
};

State& st() {
  static State s;
  return s;
}

thread_local std::vector<Context*> ctx_stack;

size_t env_size(const char* name, size_t fallback) {
  const char* v = getenv(name);
  if (!v || !*v) return fallback;
  char* end;
  unsigned long long x = strtoull(v, &end, 10);
  return *end ? fallback : size_t(x);
}

Allocation* containing(const std::map<uintptr_t, Allocation*>& m, uintptr_t p) {
  auto it = m.upper_bound(p);
  if (it == m.begin()) return nullptr;
  --it;
  Allocation* a = it->second;
  // The slack around an allocation belongs to it for reports (an access there is out of bounds).
  return p >= a->map_base && p < a->map_base + a->map_size ? a : nullptr;
}

void segv_handler(int sig, siginfo_t* info, void* uctx);
struct sigaction previous_segv;

void install_segv_handler() {
  struct sigaction sa = {};
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv);
}

// A fault inside a device mapping is an out-of-bounds or use-after-free access by a kernel or a
// library call; anything else belongs to whoever handled SIGSEGV before.
void segv_handler(int sig, siginfo_t* info, void* uctx) {
  uintptr_t p = uintptr_t(info->si_addr);
  if (Allocation* a = containing(st().live, p))
    fail("out of bounds", "access at %+lld bytes from the start of %s",
         (long long)(p - a->base), a->describe().c_str());
  if (Allocation* a = containing(st().freed, p))
    fail("use after free", "access at %+lld bytes into %s", (long long)(p - a->base),
         a->describe().c_str());
  if (previous_segv.sa_flags & SA_SIGINFO) {
    previous_segv.sa_sigaction(sig, info, uctx);
  } else {
    sigaction(SIGSEGV, &previous_segv, nullptr);
  }
}

CUresult init_state() {
  State& s = st();
  if (s.initialized) return CUDA_SUCCESS;
  s.devices.resize(std::max<size_t>(1, env_size("VGPU_DEVICES", 1)));
  s.memory_limit = env_size("VGPU_MEMORY_MB", 16384) << 20;
  s.host.t = {1};
  install_segv_handler();
  s.initialized = true;
  return CUDA_SUCCESS;
}

Context* as_ctx(CUcontext c) { return reinterpret_cast<Context*>(c); }

bool valid_ctx(Context* c) {
  for (Context* k : st().contexts)
    if (k == c) return !c->destroyed;
  return false;
}

Stream* new_stream(Context* ctx, bool legacy, bool blocking) {
  Stream* s = new Stream;
  s->ctx = ctx;
  s->actor = st().next_actor++;
  s->legacy = legacy;
  s->blocking = blocking;
  s->clock = st().host;
  ctx->streams.push_back(s);
  return s;
}

Context* new_context(int device, bool primary) {
  Context* c = new Context;
  c->device = device;
  c->primary = primary;
  c->null_stream = new_stream(c, true, true);
  st().contexts.push_back(c);
  return c;
}

std::string hex(uintptr_t p) {
  char b[32];
  snprintf(b, sizeof b, "0x%lx", (unsigned long)p);
  return b;
}

bool slack_intact(const Allocation* a) {
  const unsigned char* lo = reinterpret_cast<const unsigned char*>(a->map_base + kPage);
  const unsigned char* hi = reinterpret_cast<const unsigned char*>(a->map_base + a->map_size - kPage);
  for (const unsigned char* q = lo; q < reinterpret_cast<const unsigned char*>(a->base); ++q)
    if (*q != kSlack) return false;
  for (const unsigned char* q = reinterpret_cast<const unsigned char*>(a->base + a->size); q < hi; ++q)
    if (*q != kSlack) return false;
  return true;
}

// Device memory: the bytes end flush against a PROT_NONE page (256-byte alignment permitting), a
// second guards the start, and the slack in between is a pattern checked after every write.
CUresult device_alloc(CUdeviceptr* out, size_t size, Context* ctx, Epoch born) {
  State& s = st();
  Device& dev = s.devices[ctx->device];
  if (size > s.memory_limit || dev.used + size > s.memory_limit) return CUDA_ERROR_OUT_OF_MEMORY;
  size_t body = (std::max<size_t>(size, 1) + kAlign - 1) / kAlign * kAlign;
  size_t pages = (body + kPage - 1) / kPage * kPage;
  size_t map_size = pages + 2 * kPage;
  void* m = mmap(nullptr, map_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) return CUDA_ERROR_OUT_OF_MEMORY;
  char* inner = static_cast<char*>(m) + kPage;
  if (mprotect(inner, pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(m, map_size);
    return CUDA_ERROR_OUT_OF_MEMORY;
  }
  Allocation* a = new Allocation;
  a->map_base = uintptr_t(m);
  a->map_size = map_size;
  a->base = uintptr_t(inner + pages - body);
  a->size = size;
  a->ctx = ctx;
  a->born = born;
  memset(inner, kSlack, pages);
  memset(reinterpret_cast<void*>(a->base), kFresh, size);
  s.live[a->base] = a;
  dev.used += size;
  dev.high = std::max(dev.high, dev.used);
  *out = CUdeviceptr(a->base);
  return CUDA_SUCCESS;
}

CUresult device_free(uintptr_t p, Stream* on, const char* what) {
  State& s = st();
  auto it = s.live.find(p);
  if (it == s.live.end() || it->second->host) {
    if (containing(s.freed, p)) fail("double free", "%s of %s, already freed", what, hex(p).c_str());
    return CUDA_ERROR_INVALID_VALUE;
  }
  Allocation* a = it->second;
  if (on) {
    Epoch e = begin_op(on);
    access(on, reinterpret_cast<void*>(p), 0, Access::Write, what);
    a->died = e;
  } else {
    s.host.t[0]++;
    a->died = {0, s.host.t[0]};
  }
  if (!slack_intact(a)) fail("out of bounds", "a write past the ends of %s", a->describe().c_str());
  s.live.erase(it);
  a->freed = true;
  s.devices[a->ctx->device].used -= a->size;
  // Freed memory stays mapped without access, so a late use faults and is reported; the oldest
  // mappings are released once the quarantine grows large, in bytes or in mappings (the host
  // allows a process about 65k of them, vm.max_map_count).
  mprotect(reinterpret_cast<void*>(a->map_base), a->map_size, PROT_NONE);
  madvise(reinterpret_cast<void*>(a->map_base), a->map_size, MADV_DONTNEED);
  s.freed[a->base] = a;
  s.quarantine.push_back(a);
  s.quarantined += a->map_size;
  while ((s.quarantined > (size_t(64) << 30) || s.quarantine.size() > 8192) &&
         !s.quarantine.empty()) {
    Allocation* old = s.quarantine.front();
    s.quarantine.pop_front();
    s.quarantined -= old->map_size;
    s.freed.erase(old->base);
    munmap(reinterpret_cast<void*>(old->map_base), old->map_size);
    delete old;
  }
  return CUDA_SUCCESS;
}

// The thread pool that runs blocks, GEMM tiles and convolution slices. A run is open from its
// start until the caller has claimed or finished its own share of the items; only a worker that
// joins while it is open takes items, and the run ends when those workers are done. A worker that
// wakes late, after the run closed, joins nothing: reading the job then would race with the next
// run's setup (a stale function, or an item index claimed from one run and executed in the next).
struct Pool {
  std::mutex m;
  std::condition_variable wake, done;
  std::vector<std::thread> threads;
  void (*f)(size_t, void*) = nullptr;
  void* arg = nullptr;
  size_t n = 0;
  std::atomic<size_t> next{0};
  size_t active = 0;
  bool open = false;
  uint64_t generation = 0;

  Pool() {
    size_t k = env_size("VGPU_THREADS", std::max(1u, std::thread::hardware_concurrency()));
    for (size_t i = 1; i < k; ++i) threads.emplace_back([this] { work(); });
    for (auto& t : threads) t.detach();
  }
  // The job is read once, under the lock, while the run is open; it cannot change until this
  // worker is done, because the run waits for every worker that joined it.
  static void drain(std::atomic<size_t>& next, size_t n, void (*f)(size_t, void*), void* arg) {
    for (size_t i; (i = next.fetch_add(1)) < n;) f(i, arg);
  }
  void work() {
    uint64_t seen = 0;
    for (;;) {
      std::unique_lock<std::mutex> g(m);
      wake.wait(g, [&] { return generation != seen; });
      seen = generation;
      if (!open) continue;
      ++active;
      void (*fn)(size_t, void*) = f;
      void* a = arg;
      size_t count = n;
      g.unlock();
      drain(next, count, fn, a);
      g.lock();
      if (--active == 0) done.notify_all();
    }
  }
  void run(size_t count, void (*fn)(size_t, void*), void* a) {
    if (threads.empty() || count <= 1) {
      for (size_t i = 0; i < count; ++i) fn(i, a);
      return;
    }
    std::unique_lock<std::mutex> g(m);
    f = fn;
    arg = a;
    n = count;
    next = 0;
    open = true;
    ++generation;
    wake.notify_all();
    g.unlock();
    drain(next, count, fn, a);
    g.lock();
    open = false;
    done.wait(g, [&] { return active == 0; });
  }
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: its threads outlive static destruction
  return *p;
}

}  // namespace

std::string Stream::name() const {
  char b[64];
  if (legacy)
    snprintf(b, sizeof b, "the null stream");
  else
    snprintf(b, sizeof b, "stream #%u", actor);
  return b;
}

std::string Allocation::describe() const {
  char b[160];
  snprintf(b, sizeof b, "%s allocation %s of %zu bytes (made at %s #%u, t=%llu)",
           host ? "pinned host" : "device", hex(base).c_str(), size,
           born.actor ? "stream" : "host", born.actor, (unsigned long long)born.t);
  return b;
}

Context* current() { return ctx_stack.empty() ? nullptr : ctx_stack.back(); }

Stream* stream(void* handle, Context* ctx) {
  if (handle == nullptr || handle == CU_STREAM_LEGACY || handle == CU_STREAM_PER_THREAD)
    return ctx->null_stream;
  Stream* s = static_cast<Stream*>(handle);
  for (Stream* k : ctx->streams)
    if (k == s) return s;
  fail("invalid stream", "a stream handle that is not a live stream of the current context");
}

Epoch begin_op(Stream* s) {
  // Every enqueue on a capturing stream must go through `captured`; one that runs is a call the
  // device does not model under capture.
  if (s->capture)
    fail("stream capture", "an operation on %s ran while it captures: this call is not modelled "
         "under capture by the virtual device", s->name().c_str());
  // A blocking stream's capture forbids the legacy stream, which would be ordered with it.
  if (s->legacy)
    for (Stream* o : s->ctx->streams)
      if (o->capture && o->blocking)
        fail("stream capture", "the null stream used while %s (a blocking stream) captures",
             o->name().c_str());
  s->clock.join(st().host);
  // The legacy null stream waits for, and is waited for by, every blocking stream.
  if (s->legacy) {
    for (Stream* o : s->ctx->streams)
      if (o->blocking) s->clock.join(o->clock);
  } else if (s->blocking) {
    s->clock.join(s->ctx->null_stream->clock);
  }
  if (s->clock.t.size() <= s->actor) s->clock.t.resize(s->actor + 1, 0);
  return {s->actor, ++s->clock.t[s->actor]};
}

void host_join(const Clock& c) { st().host.join(c); }

bool captured(Stream* s, Op op) {
  if (!s->capture) return false;
  st().captures.at(s->capture).ops.push_back(std::move(op));
  return true;
}

void no_capture(Stream* s, const char* what) {
  if (s) {
    if (s->capture)
      fail("stream capture", "%s on %s while it captures (invalid during capture)", what,
           s->name().c_str());
    return;
  }
  // CU_STREAM_CAPTURE_MODE_GLOBAL prohibits potentially unsafe calls in every thread, THREAD_LOCAL
  // in the capturing thread; RELAXED prohibits none.
  for (auto& [id, c] : st().captures) {
    if (c.mode == CU_STREAM_CAPTURE_MODE_GLOBAL ||
        (c.mode == CU_STREAM_CAPTURE_MODE_THREAD_LOCAL && c.thread == std::this_thread::get_id()))
      fail("stream capture", "%s while %s captures (a potentially unsafe call, prohibited by the "
           "capture's mode)", what, c.stream->name().c_str());
  }
}

Allocation* find(const void* p) {
  Allocation* a = containing(st().live, uintptr_t(p));
  return a && uintptr_t(p) >= a->base && uintptr_t(p) < a->base + std::max<size_t>(a->size, 1)
             ? a
             : nullptr;
}

static const char* actor_name(uint32_t actor) {
  static thread_local char b[32];
  if (actor == 0) return "the host";
  snprintf(b, sizeof b, "stream #%u", actor);
  return b;
}

Allocation* access(Stream* s, const void* ptr, size_t bytes, Access acc, const char* what) {
  State& g = st();
  uintptr_t p = uintptr_t(ptr);
  Allocation* a = containing(g.live, p);
  if (!a) {
    if (Allocation* f = containing(g.freed, p))
      fail("use after free", "%s: %s is inside %s, freed", what, hex(p).c_str(), f->describe().c_str());
    fail("invalid pointer", "%s: %s is not inside any live allocation", what, hex(p).c_str());
  }
  if (p < a->base || p + bytes > a->base + a->size || (bytes == 0 && p >= a->base + a->size))
    fail("out of bounds", "%s: [%+lld, %+lld) bytes is outside %s", what, (long long)(p - a->base),
         (long long)(p - a->base + bytes), a->describe().c_str());
  if (a->ctx != s->ctx) fail("wrong context", "%s: %s belongs to another context", what, a->describe().c_str());
  if (a->host) return a;
  const Clock& c = s->clock;
  auto order = [&](Epoch e, const char* event) {
    if (!e.before(c))
      fail("stream order", "%s on %s: %s of %s happened on %s at t=%llu with no event or "
           "synchronization ordering it before this use (this stream has seen t=%llu of it)",
           what, s->name().c_str(), event, a->describe().c_str(), actor_name(e.actor),
           (unsigned long long)e.t, (unsigned long long)c.at(e.actor));
  };
  order(a->born, "the allocation");
  order(a->write, "the last write");
  if (acc == Access::Write) {
    for (auto [actor, t] : a->reads) order({actor, t}, "a read");
    a->reads.clear();
    a->write = {s->actor, c.at(s->actor)};
  } else {
    uint64_t& r = a->reads[s->actor];
    r = std::max(r, c.at(s->actor));
  }
  return a;
}

// A written allocation's slack must still hold its pattern.
void check_slack(const Allocation* a, const char* what) {
  if (!a->host && !slack_intact(a))
    fail("out of bounds", "%s wrote past the ends of %s", what, a->describe().c_str());
}

void scribble(void* p, size_t bytes) { memset(p, kFresh, bytes); }

void parallel_for(size_t n, void (*f)(size_t, void*), void* arg) { pool().run(n, f, arg); }

int device_count() {
  init_state();
  return int(st().devices.size());
}

Context* primary_context(int device) {
  init_state();
  if (device < 0 || size_t(device) >= st().devices.size()) return nullptr;
  Device& dev = st().devices[device];
  if (!dev.primary) dev.primary = new_context(device, true);
  return dev.primary;
}

}  // namespace vgpu

using namespace vgpu;

#define GUARD std::lock_guard<std::recursive_mutex> guard_(vgpu::lock())
#define NEED_INIT \
  if (!st().initialized) return CUDA_ERROR_NOT_INITIALIZED
#define NEED_CTX                               \
  NEED_INIT;                                   \
  Context* ctx = current();                    \
  if (!ctx) return CUDA_ERROR_INVALID_CONTEXT; \
  if (ctx->destroyed) return CUDA_ERROR_CONTEXT_IS_DESTROYED

template <class T>
static CUresult fill_now(Stream* s, CUdeviceptr dst, T v, size_t n, const char* what) {
  begin_op(s);
  Allocation* a = access(s, reinterpret_cast<void*>(dst), n * sizeof(T), Access::Write, what);
  T* p = reinterpret_cast<T*>(dst);
  for (size_t i = 0; i < n; ++i) p[i] = v;
  check_slack(a, what);
  return CUDA_SUCCESS;
}

template <class T>
static CUresult fill(Stream* s, CUdeviceptr dst, T v, size_t n, const char* what) {
  if (captured(s, [=](Stream* on) { return int(fill_now(on, dst, v, n, what)); }))
    return CUDA_SUCCESS;
  return fill_now(s, dst, v, n, what);
}

struct Module {
  Context* ctx;
  std::vector<unsigned char> image;
  std::map<std::string, size_t> shared;  // static shared memory per kernel, from the cubins
};

template <class T>
static bool read_at(const std::vector<unsigned char>& b, size_t at, T* v) {
  if (at > b.size() || b.size() - at < sizeof(T)) return false;
  memcpy(v, b.data() + at, sizeof(T));
  return true;
}

// Each cubin (ELF) in the fatbin has a `.nv.shared.<kernel>` section per kernel that declares
// static shared memory, sized by it; the largest over the image's architectures is kept.
static void read_static_shared(Module* m) {
  const auto& b = m->image;
  for (size_t at = 16; at + 16 <= b.size();) {
    uint32_t hsize = 0;
    uint64_t psize = 0;
    if (!read_at(b, at + 4, &hsize) || !read_at(b, at + 8, &psize) || hsize < 16) return;
    const size_t elf = at + hsize;
    if (psize > b.size() || elf > b.size() - psize) return;
    uint64_t shoff = 0;
    uint16_t shentsize = 0, shnum = 0, shstrndx = 0;
    if (psize > 64 && memcmp(b.data() + elf, "\x7f" "ELF\x02\x01", 6) == 0 &&
        read_at(b, elf + 0x28, &shoff) && read_at(b, elf + 0x3A, &shentsize) &&
        read_at(b, elf + 0x3C, &shnum) && read_at(b, elf + 0x3E, &shstrndx) && shentsize >= 64 &&
        shstrndx < shnum) {
      // Every header must lie inside this entry's own payload.
      auto section = [&](unsigned i, uint32_t* name, uint64_t* off, uint64_t* size) {
        const uint64_t rel = uint64_t(i) * shentsize;
        if (shoff > psize || rel > psize - shoff || psize - shoff - rel < 64) return false;
        const size_t h = elf + shoff + rel;
        return read_at(b, h, name) && read_at(b, h + 24, off) && read_at(b, h + 32, size);
      };
      uint32_t n;
      uint64_t stroff, strsize;
      if (section(shstrndx, &n, &stroff, &strsize) && stroff <= psize && strsize <= psize - stroff) {
        const char* strtab = reinterpret_cast<const char*>(b.data() + elf + stroff);
        static const char kPrefix[] = ".nv.shared.";
        for (unsigned i = 0; i < shnum; ++i) {
          uint32_t name;
          uint64_t off, size;
          if (!section(i, &name, &off, &size) || name >= strsize) continue;
          const char* s = strtab + name;
          if (strnlen(s, strsize - name) == strsize - name) continue;
          if (strncmp(s, kPrefix, sizeof kPrefix - 1) == 0) {
            // Anything past a block's limit is reported as just past it: it cannot launch.
            size_t& v = m->shared[s + sizeof kPrefix - 1];
            v = std::max<size_t>(v, std::min<uint64_t>(size, kMaxSharedPerBlock + 1));
          }
        }
      }
    }
    at = elf + psize;
  }
}

extern "C" {

// Build-time identification, so a test can tell this library from the real driver.
const char* vgpu_version() { return "barlow vgpu 1"; }

CUresult cuInit(unsigned int flags) {
  GUARD;
  if (flags != 0) return CUDA_ERROR_INVALID_VALUE;
  mutation();  // a bad VGPU_MUTATE is reported at once, not at the first launch it names
  return init_state();
}

CUresult cuDriverGetVersion(int* v) {
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  *v = CUDA_VERSION;
  return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult e, const char** s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  switch (e) {
    case CUDA_SUCCESS: *s = "no error"; break;
    case CUDA_ERROR_INVALID_VALUE: *s = "invalid argument"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *s = "out of memory (virtual device limit, VGPU_MEMORY_MB)"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *s = "initialization error"; break;
    case CUDA_ERROR_NO_DEVICE: *s = "no CUDA-capable device is detected"; break;
    case CUDA_ERROR_INVALID_DEVICE: *s = "invalid device ordinal"; break;
    case CUDA_ERROR_INVALID_CONTEXT: *s = "invalid device context"; break;
    case CUDA_ERROR_CONTEXT_IS_DESTROYED: *s = "context is destroyed"; break;
    case CUDA_ERROR_INVALID_IMAGE: *s = "device kernel image is invalid"; break;
    case CUDA_ERROR_NOT_FOUND: *s = "named symbol not found"; break;
    case CUDA_ERROR_INVALID_HANDLE: *s = "invalid resource handle"; break;
    case CUDA_ERROR_NOT_SUPPORTED: *s = "operation not supported"; break;
    case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *s = "too many resources requested for launch"; break;
    case CUDA_ERROR_NOT_READY: *s = "device not ready"; break;
    case CUDA_ERROR_ILLEGAL_STATE: *s = "the operation cannot be performed in the present state"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *s = "unspecified launch failure"; break;
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED: *s = "operation not permitted when stream is capturing"; break;
    case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD: *s = "attempt to terminate a thread-local capture sequence from another thread"; break;
    default: *s = "unknown error"; return CUDA_ERROR_INVALID_VALUE;
  }
  return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult e, const char** s) {
  if (!s) return CUDA_ERROR_INVALID_VALUE;
  switch (e) {
#define NAME(x) \
  case x: *s = #x; return CUDA_SUCCESS;
    NAME(CUDA_SUCCESS) NAME(CUDA_ERROR_INVALID_VALUE) NAME(CUDA_ERROR_OUT_OF_MEMORY)
    NAME(CUDA_ERROR_NOT_INITIALIZED) NAME(CUDA_ERROR_NO_DEVICE) NAME(CUDA_ERROR_INVALID_DEVICE)
    NAME(CUDA_ERROR_INVALID_CONTEXT) NAME(CUDA_ERROR_CONTEXT_IS_DESTROYED)
    NAME(CUDA_ERROR_INVALID_IMAGE) NAME(CUDA_ERROR_NOT_FOUND) NAME(CUDA_ERROR_INVALID_HANDLE)
    NAME(CUDA_ERROR_NOT_SUPPORTED) NAME(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES) NAME(CUDA_ERROR_NOT_READY)
    NAME(CUDA_ERROR_ILLEGAL_STATE) NAME(CUDA_ERROR_LAUNCH_FAILED)
    NAME(CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED) NAME(CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD)
#undef NAME
    default: *s = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
  }
}

CUresult cuDeviceGetCount(int* n) {
  GUARD;
  NEED_INIT;
  if (!n) return CUDA_ERROR_INVALID_VALUE;
  *n = int(st().devices.size());
  return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice* d, int ordinal) {
  GUARD;
  NEED_INIT;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  if (ordinal < 0 || size_t(ordinal) >= st().devices.size()) return CUDA_ERROR_INVALID_DEVICE;
  *d = ordinal;
  return CUDA_SUCCESS;
}

static bool valid_device(CUdevice d) { return d >= 0 && size_t(d) < st().devices.size(); }

CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  snprintf(name, size_t(len), "%s", kDeviceName);
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid* uuid, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!uuid) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  memset(uuid->bytes, 0, sizeof uuid->bytes);
  memcpy(uuid->bytes, "vgpu", 4);
  uuid->bytes[15] = char(d);
  return CUDA_SUCCESS;
}

CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!bytes) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  *bytes = st().memory_limit;
  return CUDA_SUCCESS;
}

CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute attr, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!v) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  switch (attr) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *v = kSmCount; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = kMaxThreadsPerBlock; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X:
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y: *v = 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z: *v = 64; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X: *v = 2147483647; break;
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y:
    case CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z: *v = 65535; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK: *v = kMaxSharedPerBlock; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR: *v = 2048; break;
    case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED: *v = 1; break;
    case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: *v = 1; break;
    case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS: *v = 1; break;
    case CU_DEVICE_ATTRIBUTE_CLOCK_RATE: *v = 1000000; break;
    case CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH: *v = 5120; break;
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext* pctx, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  Device& dev = st().devices[d];
  if (!dev.primary) dev.primary = new_context(d, true);
  ++dev.primary_refs;
  *pctx = reinterpret_cast<CUcontext>(dev.primary);
  return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  Device& dev = st().devices[d];
  if (dev.primary_refs <= 0) return CUDA_ERROR_INVALID_CONTEXT;
  // The primary context stays alive: its memory may still be in the quarantine's reports, and a
  // later retain gets the same context, as the driver's does while the process lives.
  --dev.primary_refs;
  return CUDA_SUCCESS;
}

CUresult cuCtxCreate_v4(CUcontext* pctx, CUctxCreateParams* params, unsigned int flags, CUdevice d) {
  GUARD;
  NEED_INIT;
  (void)flags;
  if (!pctx) return CUDA_ERROR_INVALID_VALUE;
  if (params && (params->execAffinityParams || params->cigParams)) return CUDA_ERROR_NOT_SUPPORTED;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  Context* c = new_context(d, false);
  ctx_stack.push_back(c);
  *pctx = reinterpret_cast<CUcontext>(c);
  return CUDA_SUCCESS;
}

CUresult cuCtxDestroy_v2(CUcontext c) {
  GUARD;
  NEED_INIT;
  Context* k = as_ctx(c);
  if (!valid_ctx(k) || k->primary) return CUDA_ERROR_INVALID_CONTEXT;
  for (auto it = st().live.begin(); it != st().live.end();) {
    Allocation* a = (it++)->second;
    if (a->ctx == k && !a->host) device_free(a->base, nullptr, "cuCtxDestroy");
  }
  k->destroyed = true;
  for (auto& e : ctx_stack)
    if (e == k) e = nullptr;
  while (!ctx_stack.empty() && ctx_stack.back() == nullptr) ctx_stack.pop_back();
  return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext c) {
  GUARD;
  NEED_INIT;
  Context* k = as_ctx(c);
  if (k && !valid_ctx(k)) return CUDA_ERROR_INVALID_CONTEXT;
  if (ctx_stack.empty()) {
    if (k) ctx_stack.push_back(k);
  } else if (k) {
    ctx_stack.back() = k;
  } else {
    ctx_stack.pop_back();
  }
  return CUDA_SUCCESS;
}

CUresult cuCtxGetCurrent(CUcontext* c) {
  GUARD;
  NEED_INIT;
  if (!c) return CUDA_ERROR_INVALID_VALUE;
  *c = reinterpret_cast<CUcontext>(current());
  return CUDA_SUCCESS;
}

CUresult cuCtxPushCurrent_v2(CUcontext c) {
  GUARD;
  NEED_INIT;
  if (!valid_ctx(as_ctx(c))) return CUDA_ERROR_INVALID_CONTEXT;
  ctx_stack.push_back(as_ctx(c));
  return CUDA_SUCCESS;
}

CUresult cuCtxPopCurrent_v2(CUcontext* c) {
  GUARD;
  NEED_INIT;
  if (ctx_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
  if (c) *c = reinterpret_cast<CUcontext>(ctx_stack.back());
  ctx_stack.pop_back();
  return CUDA_SUCCESS;
}

CUresult cuCtxGetDevice(CUdevice* d) {
  GUARD;
  NEED_CTX;
  if (!d) return CUDA_ERROR_INVALID_VALUE;
  *d = ctx->device;
  return CUDA_SUCCESS;
}

CUresult cuCtxSynchronize() {
  GUARD;
  NEED_CTX;
  for (Stream* s : ctx->streams) no_capture(s, "cuCtxSynchronize");
  for (Stream* s : ctx->streams) host_join(s->clock);
  return CUDA_SUCCESS;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
  GUARD;
  NEED_CTX;
  if (!free_bytes || !total) return CUDA_ERROR_INVALID_VALUE;
  *total = st().memory_limit;
  *free_bytes = st().memory_limit - st().devices[ctx->device].used;
  return CUDA_SUCCESS;
}

// ---- streams and events

CUresult cuStreamCreate(CUstream* out, unsigned int flags) {
  GUARD;
  NEED_CTX;
  if (!out || (flags & ~unsigned(CU_STREAM_NON_BLOCKING))) return CUDA_ERROR_INVALID_VALUE;
  *out = reinterpret_cast<CUstream>(new_stream(ctx, false, !(flags & CU_STREAM_NON_BLOCKING)));
  return CUDA_SUCCESS;
}

CUresult cuStreamCreateWithPriority(CUstream* out, unsigned int flags, int priority) {
  (void)priority;
  return cuStreamCreate(out, flags);
}

CUresult cuStreamGetPriority(CUstream, int* p) {
  if (!p) return CUDA_ERROR_INVALID_VALUE;
  *p = 0;
  return CUDA_SUCCESS;
}

CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return CUDA_SUCCESS;
}

CUresult cuStreamDestroy_v2(CUstream h) {
  GUARD;
  NEED_CTX;
  Stream* s = stream(h, ctx);
  if (s->legacy) return CUDA_ERROR_INVALID_HANDLE;
  no_capture(s, "cuStreamDestroy");
  auto& v = ctx->streams;
  v.erase(std::remove(v.begin(), v.end(), s), v.end());
  // The stream's work still completes before its resources go: nothing is reordered by a destroy.
  // Its object is kept (never reused), so a stale handle is reported instead of aliasing.
  return CUDA_SUCCESS;
}

CUresult cuStreamSynchronize(CUstream h) {
  GUARD;
  NEED_CTX;
  Stream* s = stream(h, ctx);
  no_capture(s, "cuStreamSynchronize");
  host_join(s->clock);
  return CUDA_SUCCESS;
}

CUresult cuStreamQuery(CUstream h) {
  GUARD;
  NEED_CTX;
  no_capture(stream(h, ctx), "cuStreamQuery");
  // Work runs when enqueued, but a query proves nothing about order: it does not join clocks.
  return CUDA_SUCCESS;
}

struct Event {
  Context* ctx;
  bool timing;
  bool recorded = false;
  Clock clock;
  double ms = 0;
  uint64_t capture = 0;  // last recorded in this capture (0: outside any)
};

// An event last recorded in a capture stands for work of a graph, not of a stream.
static void not_captured(Event* e, const char* what) {
  if (e->capture)
    fail("stream capture", "%s on an event recorded during a stream capture", what);
}

static double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

CUresult cuEventCreate(CUevent* out, unsigned int flags) {
  GUARD;
  NEED_CTX;
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  Event* e = new Event{ctx, !(flags & CU_EVENT_DISABLE_TIMING), false, {}, 0, 0};
  *out = reinterpret_cast<CUevent>(e);
  return CUDA_SUCCESS;
}

CUresult cuEventDestroy_v2(CUevent h) {
  GUARD;
  NEED_INIT;
  if (!h) return CUDA_ERROR_INVALID_HANDLE;
  delete reinterpret_cast<Event*>(h);
  return CUDA_SUCCESS;
}

CUresult cuEventRecord(CUevent h, CUstream hs) {
  GUARD;
  NEED_CTX;
  if (!h) return CUDA_ERROR_INVALID_HANDLE;
  Event* e = reinterpret_cast<Event*>(h);
  Stream* s = stream(hs, ctx);
  if (e->ctx != s->ctx) return CUDA_ERROR_INVALID_HANDLE;
  e->recorded = true;
  e->capture = s->capture;
  if (s->capture) return CUDA_SUCCESS;  // a point in the graph, for waits inside the capture
  begin_op(s);
  e->clock = s->clock;
  e->ms = now_ms();
  return CUDA_SUCCESS;
}

CUresult cuEventRecordWithFlags(CUevent h, CUstream hs, unsigned int) { return cuEventRecord(h, hs); }

CUresult cuStreamWaitEvent(CUstream hs, CUevent h, unsigned int flags) {
  GUARD;
  NEED_CTX;
  if (!h) return CUDA_ERROR_INVALID_HANDLE;
  Event* e = reinterpret_cast<Event*>(h);
  Stream* s = stream(hs, ctx);
  if (s->capture) {
    // Inside one stream's capture, waiting on a point of the same capture orders nothing new.
    if (e->capture == s->capture) return CUDA_SUCCESS;
    if (flags & CU_EVENT_WAIT_EXTERNAL)
      fail("stream capture", "an external event wait node is not modelled by the virtual device");
    fail("stream capture", "%s, capturing, waits for an event recorded outside the capture (an "
         "isolation error; cudarc's event tracking does this: disable it before capturing)",
         s->name().c_str());
  }
  if (e->capture)
    fail("stream capture", "%s waits for an event recorded in a capture (joining a stream into "
         "a capture is not modelled by the virtual device)", s->name().c_str());
  s->clock.join(e->clock);
  return CUDA_SUCCESS;
}

CUresult cuEventSynchronize(CUevent h) {
  GUARD;
  NEED_INIT;
  if (!h) return CUDA_ERROR_INVALID_HANDLE;
  not_captured(reinterpret_cast<Event*>(h), "cuEventSynchronize");
  host_join(reinterpret_cast<Event*>(h)->clock);
  return CUDA_SUCCESS;
}

CUresult cuEventQuery(CUevent h) {
  GUARD;
  NEED_INIT;
  if (!h) return CUDA_ERROR_INVALID_HANDLE;
  not_captured(reinterpret_cast<Event*>(h), "cuEventQuery");
  return CUDA_SUCCESS;
}

CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) {
  GUARD;
  NEED_INIT;
  if (!ms) return CUDA_ERROR_INVALID_VALUE;
  if (!a || !b) return CUDA_ERROR_INVALID_HANDLE;
  Event* x = reinterpret_cast<Event*>(a);
  Event* y = reinterpret_cast<Event*>(b);
  if (!x->timing || !y->timing) return CUDA_ERROR_INVALID_HANDLE;
  if (!x->recorded || !y->recorded) return CUDA_ERROR_INVALID_HANDLE;
  *ms = float(y->ms - x->ms);
  return CUDA_SUCCESS;
}

// The unversioned name (cuda.h maps it to _v2) is what older bindings look up.
CUresult event_elapsed_v1(float* ms, CUevent a, CUevent b) __asm__("cuEventElapsedTime");
CUresult event_elapsed_v1(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime_v2(ms, a, b); }

// ---- memory

CUresult cuMemAlloc_v2(CUdeviceptr* out, size_t bytes) {
  GUARD;
  NEED_CTX;
  if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  no_capture(nullptr, "cuMemAlloc");
  st().host.t[0]++;
  return device_alloc(out, bytes, ctx, {0, st().host.t[0]});
}

CUresult cuMemFree_v2(CUdeviceptr p) {
  GUARD;
  NEED_CTX;
  no_capture(nullptr, "cuMemFree");
  // A synchronous free waits for all work on the device first.
  for (Stream* s : ctx->streams) host_join(s->clock);
  return device_free(uintptr_t(p), nullptr, "cuMemFree");
}

CUresult cuMemAllocAsync(CUdeviceptr* out, size_t bytes, CUstream hs) {
  GUARD;
  NEED_CTX;
  if (!out || bytes == 0) return CUDA_ERROR_INVALID_VALUE;
  Stream* s = stream(hs, ctx);
  if (s->capture)
    fail("stream capture", "cuMemAllocAsync on %s while it captures: memory nodes are not "
         "modelled by the virtual device (allocate before capturing)", s->name().c_str());
  Epoch e = begin_op(s);
  return device_alloc(out, bytes, ctx, e);
}

CUresult cuMemFreeAsync(CUdeviceptr p, CUstream hs) {
  GUARD;
  NEED_CTX;
  Stream* s = stream(hs, ctx);
  if (s->capture)
    fail("stream capture", "cuMemFreeAsync on %s while it captures: memory nodes are not "
         "modelled by the virtual device", s->name().c_str());
  return device_free(uintptr_t(p), s, "cuMemFreeAsync");
}

CUresult cuMemAllocHost_v2(void** out, size_t bytes) {
  GUARD;
  NEED_CTX;
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  no_capture(nullptr, "cuMemAllocHost");
  void* p = nullptr;
  if (posix_memalign(&p, kPage, std::max<size_t>(bytes, 1)) != 0) return CUDA_ERROR_OUT_OF_MEMORY;
  Allocation* a = new Allocation;
  a->base = a->map_base = uintptr_t(p);
  a->size = a->map_size = bytes;
  a->ctx = ctx;
  a->host = true;
  st().live[a->base] = a;
  *out = p;
  return CUDA_SUCCESS;
}

CUresult cuMemHostAlloc(void** out, size_t bytes, unsigned int) { return cuMemAllocHost_v2(out, bytes); }

CUresult cuMemFreeHost(void* p) {
  GUARD;
  NEED_INIT;
  no_capture(nullptr, "cuMemFreeHost");
  auto it = st().live.find(uintptr_t(p));
  if (it == st().live.end() || !it->second->host) return CUDA_ERROR_INVALID_VALUE;
  // The host waits for nothing here: freeing pinned memory a copy still uses is the caller's bug,
  // which a real device would turn into garbage; the copies here ran already.
  delete it->second;
  st().live.erase(it);
  free(p);
  return CUDA_SUCCESS;
}

// A host buffer in a copy: pinned memory is range-checked; pageable memory cannot be.
static void host_operand(Stream* s, const void* p, size_t bytes, const char* what) {
  Allocation* a = containing(st().live, uintptr_t(p));
  if (a && a->host) access(s, p, bytes, Access::Read, what);
}

static CUresult copy(Stream* s, void* dst, const void* src, size_t bytes, int kind, const char* what) {
  char w[96];
  begin_op(s);
  snprintf(w, sizeof w, "%s source", what);
  if (kind & 1) access(s, src, bytes, Access::Read, w); else host_operand(s, src, bytes, w);
  snprintf(w, sizeof w, "%s destination", what);
  Allocation* d = nullptr;
  if (kind & 2) d = access(s, dst, bytes, Access::Write, w); else host_operand(s, dst, bytes, w);
  if (bytes) memmove(dst, src, bytes);
  if (d) check_slack(d, what);
  // A copy into pageable host memory returns only once it has completed, so the host has then
  // seen everything before it on the stream (the driver's documented behaviour).
  if (kind == 1) {
    Allocation* h = containing(st().live, uintptr_t(dst));
    if (!h || !h->host) host_join(s->clock);
  }
  return CUDA_SUCCESS;
}

enum { HtoD = 2, DtoH = 1, DtoD = 3 };

// An asynchronous copy: run now, or kept by a capture (whose host side must be pinned: a graph
// cannot copy pageable memory).
static CUresult copy_async(Stream* s, void* dst, const void* src, size_t bytes, int kind,
                           const char* what) {
  if (s->capture) {
    const void* host = kind == HtoD ? src : kind == DtoH ? dst : nullptr;
    Allocation* h = host ? containing(st().live, uintptr_t(host)) : nullptr;
    if (host && !(h && h->host))
      fail("stream capture", "%s of pageable host memory on %s while it captures", what,
           s->name().c_str());
  }
  if (captured(s, [=](Stream* on) { return int(copy(on, dst, src, bytes, kind, what)); }))
    return CUDA_SUCCESS;
  return copy(s, dst, src, bytes, kind, what);
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream hs) {
  GUARD;
  NEED_CTX;
  return copy_async(stream(hs, ctx), reinterpret_cast<void*>(dst), src, n, HtoD,
                    "cuMemcpyHtoDAsync");
}

CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream hs) {
  GUARD;
  NEED_CTX;
  return copy_async(stream(hs, ctx), dst, reinterpret_cast<void*>(src), n, DtoH,
                    "cuMemcpyDtoHAsync");
}

CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream hs) {
  GUARD;
  NEED_CTX;
  return copy_async(stream(hs, ctx), reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src),
                    n, DtoD, "cuMemcpyDtoDAsync");
}

// The synchronous copies run on the null stream and return once it is done.
static CUresult sync_copy(void* dst, const void* src, size_t n, int kind, const char* what) {
  NEED_CTX;
  no_capture(nullptr, what);
  Stream* s = ctx->null_stream;
  CUresult r = copy(s, dst, src, n, kind, what);
  host_join(s->clock);
  return r;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
  GUARD;
  return sync_copy(reinterpret_cast<void*>(dst), src, n, HtoD, "cuMemcpyHtoD");
}

CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
  GUARD;
  return sync_copy(dst, reinterpret_cast<void*>(src), n, DtoH, "cuMemcpyDtoH");
}

CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
  GUARD;
  return sync_copy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), n, DtoD, "cuMemcpyDtoD");
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream hs) {
  GUARD;
  NEED_CTX;
  return fill(stream(hs, ctx), dst, v, n, "cuMemsetD8Async");
}

CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned int v, size_t n, CUstream hs) {
  GUARD;
  NEED_CTX;
  if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
  return fill(stream(hs, ctx), dst, v, n, "cuMemsetD32Async");
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
  GUARD;
  NEED_CTX;
  no_capture(nullptr, "cuMemsetD8");
  CUresult r = fill(ctx->null_stream, dst, v, n, "cuMemsetD8");
  host_join(ctx->null_stream->clock);
  return r;
}

CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned int v, size_t n) {
  GUARD;
  NEED_CTX;
  if (dst % 4) return CUDA_ERROR_INVALID_VALUE;
  no_capture(nullptr, "cuMemsetD32");
  CUresult r = fill(ctx->null_stream, dst, v, n, "cuMemsetD32");
  host_join(ctx->null_stream->clock);
  return r;
}

// ---- the default memory pool: its statistics only

struct MemPool {
  int device;
};

CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* out, CUdevice d) {
  GUARD;
  NEED_INIT;
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  if (!valid_device(d)) return CUDA_ERROR_INVALID_DEVICE;
  static std::vector<MemPool*> pools;
  while (pools.size() <= size_t(d)) pools.push_back(new MemPool{int(pools.size())});
  *out = reinterpret_cast<CUmemoryPool>(pools[d]);
  return CUDA_SUCCESS;
}

CUresult cuMemPoolGetAttribute(CUmemoryPool p, CUmemPool_attribute attr, void* value) {
  GUARD;
  NEED_INIT;
  if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
  Device& dev = st().devices[reinterpret_cast<MemPool*>(p)->device];
  switch (attr) {
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH: *static_cast<cuuint64_t*>(value) = dev.high; break;
    case CU_MEMPOOL_ATTR_USED_MEM_CURRENT:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT: *static_cast<cuuint64_t*>(value) = dev.used; break;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: *static_cast<cuuint64_t*>(value) = 0; break;
    default: return CUDA_ERROR_NOT_SUPPORTED;
  }
  return CUDA_SUCCESS;
}

CUresult cuMemPoolSetAttribute(CUmemoryPool p, CUmemPool_attribute attr, void* value) {
  GUARD;
  NEED_INIT;
  if (!p || !value) return CUDA_ERROR_INVALID_VALUE;
  Device& dev = st().devices[reinterpret_cast<MemPool*>(p)->device];
  switch (attr) {
    case CU_MEMPOOL_ATTR_USED_MEM_HIGH:
    case CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH:
      // Only a reset to zero is allowed; the mark then restarts from what is in use now.
      if (*static_cast<cuuint64_t*>(value) != 0) return CUDA_ERROR_INVALID_VALUE;
      dev.high = dev.used;
      return CUDA_SUCCESS;
    case CU_MEMPOOL_ATTR_RELEASE_THRESHOLD: return CUDA_SUCCESS;
    default: return CUDA_ERROR_NOT_SUPPORTED;
  }
}

CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

// ---- modules and launches

static const unsigned kFatbinMagic = 0xBA55ED50u;

CUresult cuModuleLoadData(CUmodule* out, const void* image) {
  GUARD;
  NEED_CTX;
  if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
  unsigned magic;
  memcpy(&magic, image, 4);
  if (magic != kFatbinMagic) return CUDA_ERROR_INVALID_IMAGE;
  // A fatbin's header: magic, version (u16), header size (u16), payload size (u64).
  uint16_t header;
  uint64_t payload;
  memcpy(&header, static_cast<const char*>(image) + 6, 2);
  memcpy(&payload, static_cast<const char*>(image) + 8, 8);
  if (header != 16 || payload == 0 || payload > (size_t(1) << 30)) return CUDA_ERROR_INVALID_IMAGE;
  const unsigned char* b = static_cast<const unsigned char*>(image);
  Module* m = new Module{ctx, std::vector<unsigned char>(b, b + header + payload), {}};
  read_static_shared(m);
  *out = reinterpret_cast<CUmodule>(m);
  return CUDA_SUCCESS;
}

CUresult cuModuleUnload(CUmodule m) {
  GUARD;
  NEED_INIT;
  if (!m) return CUDA_ERROR_INVALID_HANDLE;
  delete reinterpret_cast<Module*>(m);
  return CUDA_SUCCESS;
}

struct Function {
  Module* module;
  const Kernel* kernel;
  size_t static_shared;
};

CUresult cuModuleGetFunction(CUfunction* out, CUmodule hm, const char* name) {
  GUARD;
  NEED_CTX;
  if (!out || !hm || !name) return CUDA_ERROR_INVALID_VALUE;
  Module* m = reinterpret_cast<Module*>(hm);
  // The kernel must be in the image the program loaded, not only in the host build.
  const auto& img = m->image;
  if (!memmem(img.data(), img.size(), name, strlen(name) + 1)) return CUDA_ERROR_NOT_FOUND;
  const Kernel* k = find_kernel(name);
  if (!k) return CUDA_ERROR_NOT_FOUND;
  auto sh = m->shared.find(name);
  *out = reinterpret_cast<CUfunction>(new Function{m, k, sh == m->shared.end() ? 0 : sh->second});
  return CUDA_SUCCESS;
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream hs, void** params, void** extra) {
  GUARD;
  NEED_CTX;
  if (!f) return CUDA_ERROR_INVALID_HANDLE;
  Function* fn = reinterpret_cast<Function*>(f);
  if (fn->module->ctx != ctx) return CUDA_ERROR_INVALID_HANDLE;
  if (extra) return CUDA_ERROR_NOT_SUPPORTED;
  if (!gx || !gy || !gz || !bx || !by || !bz) return CUDA_ERROR_INVALID_VALUE;
  if (gx > 2147483647u || gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64 ||
      size_t(bx) * by * bz > kMaxThreadsPerBlock)
    return CUDA_ERROR_INVALID_VALUE;
  // Static and dynamic shared memory together must fit a block's 48 KiB.
  if (shared > unsigned(kMaxSharedPerBlock) || fn->static_shared > size_t(kMaxSharedPerBlock) - shared)
    return CUDA_ERROR_INVALID_VALUE;
  Stream* s = stream(hs, ctx);
  LaunchShape shape{{gx, gy, gz}, {bx, by, bz}, shared};
  return CUresult(launch(fn->kernel, shape, s, params));
}

CUresult cuFuncGetAttribute(int* v, CUfunction_attribute attr, CUfunction f) {
  if (!v || !f) return CUDA_ERROR_INVALID_VALUE;
  switch (attr) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = kMaxThreadsPerBlock; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *v = 32; break;
    case CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES:
      *v = int(reinterpret_cast<Function*>(f)->static_shared);
      break;
    default: *v = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult cuFuncSetAttribute(CUfunction f, CUfunction_attribute, int) {
  return f ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

// ---- stream capture and graphs (a graph is the list of operations its capture kept)

struct Graph {
  Context* ctx;
  std::vector<Op> ops;
};

CUresult cuStreamBeginCapture(CUstream hs, CUstreamCaptureMode mode) {
  GUARD;
  NEED_CTX;
  Stream* s = stream(hs, ctx);
  if (s->legacy) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
  if (s->capture) return CUDA_ERROR_ILLEGAL_STATE;
  if (mode != CU_STREAM_CAPTURE_MODE_GLOBAL && mode != CU_STREAM_CAPTURE_MODE_THREAD_LOCAL &&
      mode != CU_STREAM_CAPTURE_MODE_RELAXED)
    return CUDA_ERROR_INVALID_VALUE;
  const uint64_t id = st().next_capture++;
  st().captures.emplace(id, State::Capture{ctx, s, mode, std::this_thread::get_id(), {}});
  s->capture = id;
  return CUDA_SUCCESS;
}

CUresult cuStreamEndCapture(CUstream hs, CUgraph* out) {
  GUARD;
  NEED_CTX;
  if (!out) return CUDA_ERROR_INVALID_VALUE;
  Stream* s = stream(hs, ctx);
  if (!s->capture) return CUDA_ERROR_ILLEGAL_STATE;
  auto it = st().captures.find(s->capture);
  if (it->second.mode != CU_STREAM_CAPTURE_MODE_RELAXED &&
      it->second.thread != std::this_thread::get_id())
    return CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD;
  *out = reinterpret_cast<CUgraph>(new Graph{ctx, std::move(it->second.ops)});
  st().captures.erase(it);
  s->capture = 0;
  return CUDA_SUCCESS;
}

CUresult cuStreamIsCapturing(CUstream hs, CUstreamCaptureStatus* status) {
  GUARD;
  NEED_CTX;
  if (!status) return CUDA_ERROR_INVALID_VALUE;
  *status = stream(hs, ctx)->capture ? CU_STREAM_CAPTURE_STATUS_ACTIVE
                                     : CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

CUresult cuGraphInstantiateWithFlags(CUgraphExec* out, CUgraph hg, unsigned long long flags) {
  GUARD;
  NEED_CTX;
  if (!out || !hg) return CUDA_ERROR_INVALID_VALUE;
  if (flags) return CUDA_ERROR_NOT_SUPPORTED;  // no instantiation flag is modelled
  Graph* g = reinterpret_cast<Graph*>(hg);
  if (g->ctx != ctx) return CUDA_ERROR_INVALID_CONTEXT;
  *out = reinterpret_cast<CUgraphExec>(new Graph(*g));
  return CUDA_SUCCESS;
}

CUresult cuGraphUpload(CUgraphExec he, CUstream hs) {
  GUARD;
  NEED_CTX;
  if (!he) return CUDA_ERROR_INVALID_VALUE;
  Stream* s = stream(hs, ctx);
  no_capture(s, "cuGraphUpload");
  return CUDA_SUCCESS;
}

CUresult cuGraphLaunch(CUgraphExec he, CUstream hs) {
  GUARD;
  NEED_CTX;
  if (!he) return CUDA_ERROR_INVALID_VALUE;
  Graph* g = reinterpret_cast<Graph*>(he);
  if (g->ctx != ctx) return CUDA_ERROR_INVALID_CONTEXT;
  Stream* s = stream(hs, ctx);
  if (s->capture)
    fail("stream capture", "a graph launched into a capture (a child graph node) is not modelled "
         "by the virtual device");
  for (const Op& op : g->ops)
    if (op(s) != 0) return CUDA_ERROR_LAUNCH_FAILED;
  return CUDA_SUCCESS;
}

CUresult cuGraphExecDestroy(CUgraphExec he) {
  GUARD;
  NEED_INIT;
  if (!he) return CUDA_ERROR_INVALID_VALUE;
  delete reinterpret_cast<Graph*>(he);
  return CUDA_SUCCESS;
}

CUresult cuGraphDestroy(CUgraph hg) {
  GUARD;
  NEED_INIT;
  if (!hg) return CUDA_ERROR_INVALID_VALUE;
  delete reinterpret_cast<Graph*>(hg);
  return CUDA_SUCCESS;
}

}  // extern "C"
