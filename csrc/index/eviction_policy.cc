// The eviction-policy factory: a built-in policy by name.
#include "index/eviction_policy.h"

namespace kvtier {

const std::vector<std::string>& EvictionPolicyNames() {
  static const std::vector<std::string> names = {"lru", "s3fifo", "lfu"};
  return names;
}

StatusOr<std::unique_ptr<EvictionPolicy>> MakeEvictionPolicy(const std::string& name) {
  if (name == "lru") return NewLruPolicy();
  if (name == "s3fifo") return NewS3FifoPolicy();
  if (name == "lfu") return NewLfuPolicy();
  return Status::InvalidArgument("eviction_policy must be 'lru', 's3fifo' or 'lfu', got '" + name +
                                 "'");
}

}  // namespace kvtier
