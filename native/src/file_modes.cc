#include "file_modes.h"

namespace ucm {
namespace {
FileModes g_modes;
}

void SetShareWithGroup(bool share) { g_modes = share ? FileModes{0660, 02770} : FileModes{0600, 0700}; }

const FileModes& Modes() { return g_modes; }

}  // namespace ucm
