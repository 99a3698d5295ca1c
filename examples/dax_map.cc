// Opens a file on a vpmfs mount and maps part of it straight from the image with dax_map().
// On a direct region (the image on a DAX filesystem or devdax) stores made durable with
// vpmfs::pmem::persist() are durable for good; on a writeback region (an image on an ordinary
// disk or tmpfs, the virtio-pmem case) dax_map() refuses with EOPNOTSUPP and says why, and
// fsync is the way to durability.
//
//   dax_map FILE_ON_MOUNT     exit 0: mapped, written and persisted; 3: refused (writeback
//                             region, EOPNOTSUPP); 1: any other error
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "vpmfs/dax.h"
#include "vpmfs/persist.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s FILE_ON_MOUNT\n", argv[0]);
    return 2;
  }
  int fd = open(argv[1], O_RDWR | O_CREAT, 0644);
  if (fd < 0) {
    std::fprintf(stderr, "%s: %s\n", argv[1], std::strerror(errno));
    return 1;
  }
  constexpr uint64_t kLength = 4096;  // a multiple of the block size, inside the file
  struct stat st {};
  if (fstat(fd, &st) != 0 ||
      (static_cast<uint64_t>(st.st_size) < kLength && ftruncate(fd, kLength) != 0)) {
    std::fprintf(stderr, "%s: %s\n", argv[1], std::strerror(errno));
    close(fd);
    return 1;
  }
  auto mapping = vpmfs::dax_map(fd, 0, kLength);
  if (!mapping) {
    const vpmfs::Status& s = mapping.status();
    std::fprintf(stderr, "dax_map: %s\n", s.to_string().c_str());
    close(fd);
    return s.error() == EOPNOTSUPP ? 3 : 1;
  }
  static const char kText[] = "stored through a DAX mapping";
  std::byte* p = (*mapping)->at(0);
  std::memcpy(p, kText, sizeof kText);
  vpmfs::pmem::persist(p, sizeof kText);  // CLWB + SFENCE: durable, no msync
  std::printf("mapped %llu bytes of %s (MAP_SYNC: %s) and persisted a store\n",
              static_cast<unsigned long long>(kLength), argv[1],
              (*mapping)->map_sync() ? "yes" : "no, forced persistent");
  mapping->reset();  // unpins the range
  close(fd);
  return 0;
}
