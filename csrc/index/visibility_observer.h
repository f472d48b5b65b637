// VisibilityObserver: told each time a chunk becomes findable in a tier's index, or stops being
// findable there. The index and the disk store call it under their own lock, so the calls for one
// key come in the order of its changes; it must be cheap and must not call back into the caller.
#pragma once

#include "index/chunk_key.h"

namespace kvtier {

// visible: true when `key` became findable (Lookup / Contains see it from now on), false when it
// stopped being findable. Exactly one call per change; none for entries that were never visible.
using VisibilityObserver = void (*)(void* ctx, const ChunkKey& key, bool visible);

}  // namespace kvtier
