#include "guarded_copy.h"

#include <atomic>
#include <csetjmp>
#include <csignal>
#include <cstring>
#include <mutex>

namespace ucm {
namespace {

// The thread's way out of a fault, set only while it copies. Touched before
// each copy, so the handler never allocates this thread-local storage.
// Volatile: the stores around the copies must happen (the compiler sees no
// reader of it but a signal handler).
thread_local sigjmp_buf* volatile t_escape = nullptr;
struct sigaction g_previous;
std::once_flag g_installed;

void OnBus(int sig, siginfo_t* info, void* context) {
  if (sigjmp_buf* escape = t_escape) {
    t_escape = nullptr;
    siglongjmp(*escape, 1);
  }
  // Not a guarded copy: behave as before we were installed.
  if (g_previous.sa_flags & SA_SIGINFO) {
    g_previous.sa_sigaction(sig, info, context);
  } else if (g_previous.sa_handler != SIG_IGN && g_previous.sa_handler != SIG_DFL) {
    g_previous.sa_handler(sig);
  } else {
    signal(sig, SIG_DFL);
    raise(sig);
  }
}

void Install() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = OnBus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &g_previous);
}

}  // namespace

bool GuardedCopies(const CopyRange* copies, size_t n) {
  std::call_once(g_installed, Install);
  sigjmp_buf escape;
  t_escape = nullptr;                           // allocates this thread's slot now, outside any handler
  if (sigsetjmp(escape, 1) != 0) return false;  // 1: restores the signal mask on the way out
  t_escape = &escape;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  for (size_t i = 0; i < n; ++i) std::memcpy(copies[i].dst, copies[i].src, copies[i].len);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  t_escape = nullptr;
  return true;
}

}  // namespace ucm
