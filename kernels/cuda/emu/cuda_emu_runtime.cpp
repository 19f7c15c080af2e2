// The CUDA emulator's runtime: fibers, the block scheduler, warp collectives, the launch API.
// See cuda_emu.h for the execution model.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// Static __shared__ arrays live in this section (see cuda_emu.h); the linker defines its bounds.
extern "C" {
extern unsigned char __start_sc2emu_shared[] __attribute__((weak, visibility("hidden")));
extern unsigned char __stop_sc2emu_shared[] __attribute__((weak, visibility("hidden")));
}

namespace emu {

namespace {
unsigned char* shared_lo() { return __start_sc2emu_shared; }
unsigned char* shared_hi() { return __stop_sc2emu_shared; }
}  // namespace

// ---- 16-bit floats ------------------------------------------------------------------------------
static uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
static float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float half_bits_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in fp32
    const float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  if (exp == 31) return u2f(sign | 0x7f800000u | (man << 13));
  return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

uint32_t float_to_half_bits(float x) {
  const uint32_t f = f2u(x), sign = (f >> 16) & 0x8000u, a = f & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;              // NaN (CUDA's canonical half NaN)
  if (a >= 0x477ff000u) return sign | 0x7c00u;      // >= 65520 rounds to infinity
  if (a < 0x38800000u) {                            // below 2^-14: subnormal half, unit 2^-24
    const float scaled = std::fabs(x) * 16777216.0f;  // exact (power-of-two scaling)
    return sign | static_cast<uint32_t>(std::nearbyint(scaled));  // ties to even
  }
  uint32_t h = ((((a >> 23) - 127u + 15u) << 10) | ((a & 0x7fffffu) >> 13));
  const uint32_t rem = a & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return sign | h;
}

float bf16_bits_to_float(uint32_t h) { return u2f((h & 0xffffu) << 16); }

uint32_t float_to_bf16_bits(float x) {
  const uint32_t f = f2u(x);
  if ((f & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN
  return (f + 0x7fffu + ((f >> 16) & 1u)) >> 16;
}

namespace {

// ---- fibers -------------------------------------------------------------------------------------
constexpr size_t kStackBytes = 256 * 1024;

struct Fiber {
  void* sp = nullptr;
  char* stack_lo = nullptr;
  char* stack_hi = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
};

enum class St : uint8_t { Ready, WaitWarp, WaitBar, Done };

struct Thread {
  Fiber fiber;
  uint3 tid{0, 0, 0};
  St st = St::Ready;
  LaneSlot slot;
};

struct Runtime {
  std::mutex launch_mu;  // one launch at a time (fibers and static shared arrays are global)
  std::mutex attr_mu;
  std::unordered_map<const void*, int> max_dynamic_smem;

  char* stacks = nullptr;
  size_t stacks_len = 0, stack_count = 0;
  std::vector<Thread> threads;
  Fiber sched;
  Thread* cur = nullptr;

  KernelBody body = nullptr;
  void* ctx = nullptr;
  unsigned char* smem = nullptr;
  unsigned char* smem_alloc = nullptr;  // smem - kSmemGuard
  size_t smem_cap = 0, smem_len = 0;

  unsigned n = 0, done = 0, bar_waiting = 0;
  bool failed = false;
  std::string error;

  std::mutex err_mu;
  cudaError_t last_error = cudaSuccess;
  cudaError_t message_code = cudaSuccess;  // the error last_message describes (kept when cleared)
  std::string last_message;
};

Runtime g;

}  // namespace

namespace detail {
const uint3* g_thread_idx = nullptr;
uint3 g_block_idx{0, 0, 0};
dim3 g_block_dim, g_grid_dim;
unsigned char* g_dynamic_smem = nullptr;
}  // namespace detail

namespace {

[[noreturn]] void fiber_main();

#if defined(__x86_64__)
// switch_stacks(&save_sp, load_sp): saves the callee-saved registers on the current stack, stores
// its stack pointer, loads the other one and restores its registers (System V x86-64 ABI).
extern "C" void sc2emu_switch_stacks(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl sc2emu_switch_stacks
  .hidden sc2emu_switch_stacks
  .type sc2emu_switch_stacks,@function
sc2emu_switch_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size sc2emu_switch_stacks, .-sc2emu_switch_stacks
)");

void start_fiber(Fiber& f) {
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(f.stack_hi) & ~uintptr_t{15});
  *--sp = nullptr;                                      // fiber_main's return address (never used)
  *--sp = reinterpret_cast<void*>(&fiber_main);         // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--sp = nullptr;          // rbp rbx r12-r15
  f.sp = sp;  // after the pops and ret: rsp = top - 8, as at any function entry
}
inline void switch_fiber(Fiber& from, Fiber& to) { sc2emu_switch_stacks(&from.sp, to.sp); }
#else
void fiber_main_uc() { fiber_main(); }
void start_fiber(Fiber& f) {
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack_lo;
  f.uc.uc_stack.ss_size = static_cast<size_t>(f.stack_hi - f.stack_lo);
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, fiber_main_uc, 0);
}
inline void switch_fiber(Fiber& from, Fiber& to) { swapcontext(&from.uc, &to.uc); }
#endif

std::string fmt_uint3(const char* name, uint3 v) {
  return std::string(name) + " (" + std::to_string(v.x) + "," + std::to_string(v.y) + "," +
         std::to_string(v.z) + ")";
}

// Marks the launch failed (first message wins).
void set_failed(const std::string& what) {
  if (!g.failed) {
    g.failed = true;
    g.error = what + " [" + fmt_uint3("block", detail::g_block_idx) + "]";
  }
}

void yield_to_scheduler() { switch_fiber(g.cur->fiber, g.sched); }

[[noreturn]] void fiber_main() {
  g.body(g.ctx);
  g.cur->st = St::Done;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

void run(Thread& t) {
  g.cur = &t;
  detail::g_thread_idx = &t.tid;
  switch_fiber(g.sched, t.fiber);
}

void ensure_stacks(unsigned n) {
  if (g.stack_count >= n) return;
  if (g.stacks != nullptr) munmap(g.stacks, g.stacks_len);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t stride = kStackBytes + page;  // a guard page below each stack
  g.stacks_len = stride * n;
  void* mem = mmap(nullptr, g.stacks_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) {
    g.stacks = nullptr;
    g.stack_count = 0;
    throw std::bad_alloc();
  }
  g.stacks = static_cast<char*>(mem);
  g.stack_count = n;
  g.threads.assign(n, Thread{});
  for (unsigned i = 0; i < n; ++i) {
    char* base = g.stacks + stride * i;
    mprotect(base, page, PROT_NONE);
    g.threads[i].fiber.stack_lo = base + page;
    g.threads[i].fiber.stack_hi = base + stride;
  }
}

// Poisoned guard zones around the dynamic shared memory: reads past either end see NaN, writes
// there are reported when the block ends.
constexpr size_t kSmemGuard = 1024;

void ensure_smem(size_t bytes) {
  if (bytes > g.smem_cap || g.smem_alloc == nullptr) {
    std::free(g.smem_alloc);
    const size_t cap = (bytes + 127) / 128 * 128;
    g.smem_alloc = static_cast<unsigned char*>(std::aligned_alloc(128, cap + 2 * kSmemGuard));
    if (g.smem_alloc == nullptr) throw std::bad_alloc();
    g.smem = g.smem_alloc + kSmemGuard;
    g.smem_cap = cap;
  }
  g.smem_len = bytes;
  detail::g_dynamic_smem = bytes ? g.smem : nullptr;
}

bool in_shared(const void* p, size_t len) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (g.smem_len && c >= g.smem && c + len <= g.smem + g.smem_len) return true;
  return shared_lo() != nullptr && c >= shared_lo() && c + len <= shared_hi();
}

// ---- warp collectives ---------------------------------------------------------------------------
const char* op_name(int op) {
  switch (op) {
    case kShfl: return "a shuffle";
    case kSyncWarp: return "__syncwarp";
    case kMma: return "mma.sync";
    case kLdmatrix: return "ldmatrix";
    default: return "an unknown collective";
  }
}

float elem(uint32_t reg, int hi, int bf16) {
  const uint32_t bits = hi ? reg >> 16 : reg & 0xffffu;
  return bf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

void do_shfl(Thread* const* L) {
  const int mode = L[0]->slot.mode, width = L[0]->slot.width;
  if (width < 1 || width > 32 || (width & (width - 1)))
    return set_failed("shuffle width " + std::to_string(width) + " is not a power of two <= 32");
  for (int l = 0; l < 32; ++l)
    if (L[l]->slot.mode != mode || L[l]->slot.width != width)
      return set_failed("lanes of warp " + std::to_string(L[0]->tid.x / 32) +
                        " are at different shuffle kinds or widths");
  // PTX ISA shfl.sync: c = ((32 - width) << 8) | (up ? 0 : 31).
  const unsigned segmask = static_cast<unsigned>(32 - width) & 31u, cval = mode == kShflUp ? 0u : 31u;
  for (int l = 0; l < 32; ++l) {
    const unsigned lane = static_cast<unsigned>(l), b = static_cast<unsigned>(L[l]->slot.arg) & 31u;
    const int max_lane = static_cast<int>((lane & segmask) | (cval & ~segmask));
    const int min_lane = static_cast<int>(lane & segmask);
    int j = 0;
    bool ok = false;
    switch (mode) {
      case kShflUp: j = l - static_cast<int>(b); ok = j >= max_lane; break;
      case kShflDown: j = l + static_cast<int>(b); ok = j <= max_lane; break;
      case kShflXor: j = static_cast<int>(lane ^ b); ok = j <= max_lane; break;
      default: j = min_lane | static_cast<int>(b & ~segmask); ok = j <= max_lane; break;
    }
    L[l]->slot.out_value = L[ok ? j : l]->slot.value;
  }
}

// mma.m16n8k16 (.row.col, f32 accumulators) with the fragments of the PTX ISA: g = lane / 4,
// t = lane % 4; a0..a7 (registers a[0..3], two halves each): rows g (a0,a1,a4,a5) and g + 8
// (a2,a3,a6,a7), columns 2t + (i & 1) + 8 * (i >= 4); b0..b3: rows 2t + (i & 1) + 8 * (i >= 2),
// column g; c0..c3: row g (c0,c1) or g + 8 (c2,c3), column 2t + (i & 1).
void do_mma(Thread* const* L) {
  const int bf16 = L[0]->slot.mode;
  for (int l = 0; l < 32; ++l)
    if (L[l]->slot.mode != bf16) return set_failed("mma.sync: lanes disagree on the operand type");
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int gr = l / 4, t = l % 4;
    const uint32_t* in = L[l]->slot.in;
    for (int h = 0; h < 2; ++h) {
      A[gr][2 * t + h] = elem(in[0], h, bf16);
      A[gr + 8][2 * t + h] = elem(in[1], h, bf16);
      A[gr][2 * t + 8 + h] = elem(in[2], h, bf16);
      A[gr + 8][2 * t + 8 + h] = elem(in[3], h, bf16);
      B[2 * t + h][gr] = elem(in[4], h, bf16);
      B[2 * t + 8 + h][gr] = elem(in[5], h, bf16);
      C[gr][2 * t + h] = u2f(in[6 + h]);
      C[gr + 8][2 * t + h] = u2f(in[8 + h]);
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int gr = l / 4, t = l % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = gr + 8 * (i / 2), col = 2 * t + (i & 1);
      float acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];  // products exact in fp32
      L[l]->slot.out[i] = f2u(acc);
    }
  }
}

// ldmatrix.m8n8.x{1,2,4}[.trans].b16: lanes 8i..8i+7 hold the row addresses of matrix i; lane l
// receives, per matrix, elements [l/4][2(l%4)], [l/4][2(l%4)+1] (transposed: [2(l%4)][l/4],
// [2(l%4)+1][l/4]), the first in the low half.
void do_ldmatrix(Thread* const* L) {
  const int n = L[0]->slot.mode, trans = L[0]->slot.arg;
  if (n != 1 && n != 2 && n != 4) return set_failed("ldmatrix: .x" + std::to_string(n) + " does not exist");
  for (int l = 0; l < 32; ++l)
    if (L[l]->slot.mode != n || L[l]->slot.arg != trans)
      return set_failed("ldmatrix: lanes disagree on .x count or .trans");
  for (int l = 0; l < 8 * n; ++l) {
    const void* p = L[l]->slot.addr;
    if (reinterpret_cast<uintptr_t>(p) % 16)
      return set_failed("ldmatrix: row address of lane " + std::to_string(l) + " is not 16-byte aligned");
    if (!in_shared(p, 16))
      return set_failed("ldmatrix: row address of lane " + std::to_string(l) + " is not in shared memory (dynamic, or static __shared__ outside templates)");
  }
  auto at = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const unsigned char*>(L[8 * m + row]->slot.addr) + 2 * col, 2);
    return static_cast<uint32_t>(v);
  };
  for (int l = 0; l < 32; ++l) {
    const int r = l / 4, c = 2 * (l % 4);
    for (int m = 0; m < n; ++m)
      L[l]->slot.out[m] = trans ? at(m, c, r) | (at(m, c + 1, r) << 16) : at(m, r, c) | (at(m, r, c + 1) << 16);
  }
}

void complete_collective(Thread* const* L) {
  const int op = L[0]->slot.op;
  for (int l = 0; l < 32; ++l) {
    if (L[l]->slot.op != op)
      return set_failed(std::string("divergent warp: lane 0 waits at ") + op_name(op) + ", lane " +
                        std::to_string(l) + " at " + op_name(L[l]->slot.op));
    if (L[l]->slot.mask != 0xffffffffu) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "0x%08x", L[l]->slot.mask);
      return set_failed(std::string(op_name(op)) + " with member mask " + buf +
                        ": only full-warp masks are emulated");
    }
  }
  switch (op) {
    case kSyncWarp: break;
    case kShfl: do_shfl(L); break;
    case kMma: do_mma(L); break;
    case kLdmatrix: do_ldmatrix(L); break;
    default: set_failed("unknown warp collective");
  }
}

// ---- the block scheduler ------------------------------------------------------------------------
std::string thread_name(const Thread& t) { return fmt_uint3("thread", t.tid); }

void after_run(Thread& t) {
  if (g.failed) return;
  if (t.st == St::WaitBar) {
    if (g.done > 0)
      return set_failed(thread_name(t) + " reached __syncthreads after " + std::to_string(g.done) +
                        " thread(s) of its block exited (a barrier in divergent code)");
    ++g.bar_waiting;
  } else if (t.st == St::Done) {
    ++g.done;
    if (g.bar_waiting > 0)
      return set_failed(thread_name(t) + " exited while " + std::to_string(g.bar_waiting) +
                        " thread(s) of its block wait at __syncthreads (a barrier in divergent code)");
  }
}

// Runs one warp as far as it can go: its ready lanes until each waits, then its collective when
// all 32 lanes wait at one. Returns whether any lane ran.
bool run_warp(unsigned w, bool reverse) {
  const unsigned first = 32 * w, count = std::min(32u, g.n - first);
  bool any = false;
  for (;;) {
    bool ran = false;
    for (unsigned i = 0; i < count; ++i) {
      Thread& t = g.threads[first + (reverse ? count - 1 - i : i)];
      if (t.st != St::Ready) continue;
      t.st = St::Ready;
      run(t);
      ran = any = true;
      after_run(t);
      if (g.failed) return any;
    }
    unsigned waiting = 0;
    for (unsigned i = 0; i < count; ++i) waiting += g.threads[first + i].st == St::WaitWarp;
    if (waiting == 0 || waiting < count) {
      if (!ran) return any;
      continue;
    }
    if (count < 32) {
      set_failed(std::string(op_name(g.threads[first].slot.op)) + " in warp " + std::to_string(w) +
                 " of only " + std::to_string(count) + " threads (block size not a multiple of 32)");
      return any;
    }
    Thread* lanes[32];
    for (unsigned i = 0; i < 32; ++i) lanes[i] = &g.threads[first + i];
    complete_collective(lanes);
    if (g.failed) return any;
    for (unsigned i = 0; i < 32; ++i) lanes[i]->st = St::Ready;
    any = true;
  }
}

std::string deadlock_report() {
  unsigned bar = 0, warp = 0, done = 0;
  std::string detail;
  for (unsigned i = 0; i < g.n; ++i) {
    const Thread& t = g.threads[i];
    bar += t.st == St::WaitBar;
    warp += t.st == St::WaitWarp;
    done += t.st == St::Done;
  }
  for (unsigned w = 0; w * 32 < g.n && detail.empty(); ++w) {
    unsigned at_coll = 0, other = 0;
    for (unsigned i = 32 * w; i < std::min(g.n, 32 * w + 32); ++i)
      (g.threads[i].st == St::WaitWarp ? at_coll : other) += 1;
    if (at_coll && other)
      detail = "; warp " + std::to_string(w) + ": " + std::to_string(at_coll) +
               " lane(s) at a warp collective, " + std::to_string(other) + " elsewhere";
  }
  return "deadlock (divergent __syncthreads or warp collective): " + std::to_string(bar) +
         " thread(s) at __syncthreads, " + std::to_string(warp) + " at warp collectives, " +
         std::to_string(done) + " exited" + detail;
}

void check_smem_guards() {
  for (size_t i = 0; i < kSmemGuard; ++i) {
    if (g.smem[-1 - static_cast<ptrdiff_t>(i)] != 0xff)
      return set_failed("write to byte " + std::to_string(i + 1) + " before the dynamic shared memory");
    if (g.smem[g.smem_len + i] != 0xff)
      return set_failed("write to byte " + std::to_string(g.smem_len + i) + " of " +
                        std::to_string(g.smem_len) + " bytes of dynamic shared memory (out of bounds)");
  }
}

void run_block(unsigned linear) {
  // Poison shared memory: a read before a write shows up as NaN (0xFF.. in f16, bf16 and f32).
  std::memset(g.smem - kSmemGuard, 0xff, g.smem_len + 2 * kSmemGuard);
  if (shared_lo() != nullptr && shared_hi() > shared_lo())
    std::memset(shared_lo(), 0xff, static_cast<size_t>(shared_hi() - shared_lo()));
  const dim3 bd = detail::g_block_dim;
  for (unsigned i = 0; i < g.n; ++i) {
    Thread& t = g.threads[i];
    t.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    t.st = St::Ready;
    t.slot = LaneSlot{};
    start_fiber(t.fiber);
  }
  g.done = g.bar_waiting = 0;
  const unsigned warps = (g.n + 31) / 32;
  const bool reverse = linear % 2 == 1;  // alternate warp and lane order between blocks
  while (!g.failed) {
    bool progress = false;
    for (unsigned i = 0; i < warps && !g.failed; ++i) progress |= run_warp(reverse ? warps - 1 - i : i, reverse);
    if (g.failed) return;
    if (g.done == g.n) return check_smem_guards();
    if (g.bar_waiting > 0 && g.bar_waiting == g.n - g.done) {
      for (Thread& t : g.threads)
        if (t.st == St::WaitBar) t.st = St::Ready;
      g.bar_waiting = 0;
      continue;
    }
    if (!progress) set_failed(deadlock_report());
  }
}

const char* generic_message(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDeviceFunction: return "invalid device function";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

cudaError_t record(cudaError_t err, const std::string& detail) {
  std::lock_guard<std::mutex> lock(g.err_mu);
  g.last_error = g.message_code = err;
  g.last_message = std::string(generic_message(err)) + " (emulator: " + detail + ")";
  return err;
}

}  // namespace

// ---- fiber side ---------------------------------------------------------------------------------
LaneSlot& lane_slot() { return g.cur->slot; }

void warp_collective() {
  g.cur->st = St::WaitWarp;
  yield_to_scheduler();
}

void syncthreads() {
  g.cur->st = St::WaitBar;
  yield_to_scheduler();
}

void fail(const char* what) {
  set_failed(thread_name(*g.cur) + ": " + what);
  yield_to_scheduler();
  std::abort();
}

// ---- host side ----------------------------------------------------------------------------------
cudaError_t set_func_attribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return record(cudaErrorInvalidDeviceFunction, "cudaFuncSetAttribute on a null function");
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > kMaxDynamicSmem)
      return record(cudaErrorInvalidValue, "cudaFuncAttributeMaxDynamicSharedMemorySize " +
                                               std::to_string(value) + " > " + std::to_string(kMaxDynamicSmem));
    std::lock_guard<std::mutex> lock(g.attr_mu);
    g.max_dynamic_smem[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  return record(cudaErrorInvalidValue, "unsupported function attribute");
}

cudaError_t get_last_error(bool clear) {
  std::lock_guard<std::mutex> lock(g.err_mu);
  const cudaError_t err = g.last_error;
  if (clear) g.last_error = cudaSuccess;
  return err;
}

const char* error_string(cudaError_t err) {
  {
    std::lock_guard<std::mutex> lock(g.err_mu);
    if (err != cudaSuccess && err == g.message_code && !g.last_message.empty()) return g.last_message.c_str();
  }
  return generic_message(err);
}

cudaError_t launch(const void* func, dim3 grid, dim3 block, size_t smem_bytes, KernelBody body, void* ctx) {
  std::lock_guard<std::mutex> lock(g.launch_mu);
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    return record(cudaErrorInvalidConfiguration,
                  "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
                      ") block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                      std::to_string(block.z) + ")");
  size_t allowed = kDefaultDynamicSmem;
  {
    std::lock_guard<std::mutex> alock(g.attr_mu);
    auto it = g.max_dynamic_smem.find(func);
    if (it != g.max_dynamic_smem.end()) allowed = static_cast<size_t>(it->second);
  }
  if (smem_bytes > allowed)
    return record(cudaErrorInvalidValue, "launch with " + std::to_string(smem_bytes) +
                                             " bytes of dynamic shared memory, the kernel allows " +
                                             std::to_string(allowed) + " (cudaFuncSetAttribute)");
  ensure_stacks(static_cast<unsigned>(n));
  ensure_smem(smem_bytes);
  g.n = static_cast<unsigned>(n);
  g.body = body;
  g.ctx = ctx;
  g.failed = false;
  g.error.clear();
  detail::g_grid_dim = grid;
  detail::g_block_dim = block;
  unsigned linear = 0;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x, ++linear) {
        detail::g_block_idx = uint3{x, y, z};
        run_block(linear);
        if (g.failed) {
          g.cur = nullptr;
          return record(cudaErrorLaunchFailure, g.error);
        }
      }
  g.cur = nullptr;
  return cudaSuccess;
}

}  // namespace emu
