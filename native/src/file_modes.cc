#include "file_modes.h"

#include <sys/stat.h>

#include <cerrno>

namespace ucm {
namespace {
FileModes g_modes;
}

void SetShareWithGroup(bool share) { g_modes = share ? FileModes{0660, 02770} : FileModes{0600, 0700}; }

const FileModes& Modes() { return g_modes; }

int MakeDir(const char* path) {
  if (mkdir(path, g_modes.dir) != 0) return errno;
  chmod(path, g_modes.dir);  // ours: exact mode regardless of the umask
  return 0;
}

}  // namespace ucm
