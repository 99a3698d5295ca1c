// Embeds a vpmfs Volume in a program, without FUSE: formats an image, mounts it in this process,
// writes a file, makes it durable, reads it back.
//
//   embed_volume IMAGE        (IMAGE is created, 64 MiB sparse; an existing vpmfs image is reused)
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <string>

#include "vpmfs/fs.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s IMAGE\n", argv[0]);
    return 2;
  }
  const std::string image = argv[1];
  vpmfs::MkfsOptions mkfs;
  mkfs.size = 64ull << 20;
  if (auto s = vpmfs::Volume::mkfs(image, mkfs); !s) {
    std::fprintf(stderr, "mkfs: %s\n", s.to_string().c_str());
    return 1;
  }
  vpmfs::MountOptions options;  // persistence mode detected: writeback on an ordinary file
  auto volume = vpmfs::Volume::mount(image, options);
  if (!volume) {
    std::fprintf(stderr, "mount: %s\n", volume.status().to_string().c_str());
    return 1;
  }
  vpmfs::Volume& v = **volume;
  auto file = v.mknod(vpmfs::kRootIno, "hello.txt", S_IFREG | 0644, 0, 0, 0);
  if (!file) {
    std::fprintf(stderr, "create: %s\n", file.status().to_string().c_str());
    return 1;
  }
  const std::string text = "hello from an embedded vpmfs volume\n";
  auto written = v.write(file->ino, 0, text.data(), text.size());
  if (!written || *written != text.size()) {
    std::fprintf(stderr, "write failed\n");
    return 1;
  }
  if (auto s = v.sync_wait(); !s) {  // commit: durable from here on
    std::fprintf(stderr, "sync: %s\n", s.to_string().c_str());
    return 1;
  }
  std::string back(text.size(), '\0');
  auto found = v.lookup(vpmfs::kRootIno, "hello.txt");
  if (!found) {
    std::fprintf(stderr, "lookup: %s\n", found.status().to_string().c_str());
    return 1;
  }
  auto got = v.read(found->ino, 0, back.data(), back.size());
  if (!got || *got != text.size() || back != text) {
    std::fprintf(stderr, "read back something else\n");
    return 1;
  }
  std::printf("%s: mode %s, wrote and read back %zu bytes: %s", image.c_str(),
              v.mode() == vpmfs::PersistMode::direct ? "direct" : "writeback or unsafe",
              back.size(), back.c_str());
  return 0;
}
