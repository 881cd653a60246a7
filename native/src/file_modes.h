// Who may read what the engine stores. Block files hold KV cache contents
// (a function of users' prompts): by default only the engine's user may read
// them (files 0600, directories 0700). Engines of several users sharing one
// store (one group, e.g. an NFS directory shared by a team's nodes) choose
// group access: files 0660, directories 02770 (setgid, so new entries keep
// the directory's group). Set once per process, before any file is made.
#pragma once
#include <sys/types.h>

namespace ucm {

struct FileModes {
  mode_t file = 0600;
  mode_t dir = 0700;
};

void SetShareWithGroup(bool share);
const FileModes& Modes();

// Directories are made by MakeOwnDir (store_dirs.h), which sets the mode
// through a descriptor, never by path.

}  // namespace ucm
