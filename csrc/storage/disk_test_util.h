// Helpers shared by the C++ tests that touch a disk: a scratch directory, and whether io_uring
// runs on this machine. Test code only.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "storage/uring_backend.h"

namespace kvtier::test {

// A fresh directory under $KVTIER_TEST_DISK_DIR (default /tmp; point it at a file system that
// takes O_DIRECT), removed with its contents when the object goes.
class TempDir {
 public:
  explicit TempDir(const std::string& name) {
    const char* base = std::getenv("KVTIER_TEST_DISK_DIR");
    std::string tmpl = std::string(base ? base : "/tmp") + "/" + name + "_XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) == nullptr) std::abort();
    path_ = buf.data();
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Why an io_uring ring cannot be made here (not compiled in, or refused by the kernel); empty
// when it can.
inline std::string UringUnavailable() {
  int fd = open("/dev/null", O_RDONLY);
  auto probe = CreateUringBackend(fd, IoBackendOptions{});
  close(fd);
  return probe.ok() ? std::string() : probe.status().ToString();
}

}  // namespace kvtier::test
