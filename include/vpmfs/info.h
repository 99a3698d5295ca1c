// Looking at a vpmfs image without taking it over, for vpmfs-ctl: the image header, the BTT's
// arenas and a summary of the filesystem. The image is opened read-only with no lock, so this
// works while it is mounted; the figures are then those of the media at that moment (what the
// last commit made durable), and the daemon may be changing them.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "vpmfs/btt.h"
#include "vpmfs/btt_inspect.h"
#include "vpmfs/region.h"
#include "vpmfs/status.h"

namespace vpmfs {

struct ImageHeaderView {
  uint32_t version = 0;
  uint32_t header_size = 0;
  uint64_t image_size = 0;
  uint64_t intent_log_offset = 0;
  uint64_t intent_log_size = 0;
  uint64_t kill_log_offset = 0;
  uint64_t kill_log_size = 0;
  uint64_t btt_offset = 0;
  uint64_t btt_size = 0;
  Uuid uuid{};
  std::string label;
  int64_t created_sec = 0;
  uint32_t sector_size = 0;
  uint32_t lanes = 0;
  uint64_t checksum = 0;  // as stored
  bool checksum_ok = false;
  // The layout lies inside the image, in order (the checks a mount makes).
  bool layout_ok = false;
};

struct JournalView {
  uint64_t start = 0;
  uint64_t blocks = 0;
  bool transaction = false;  // the first block holds a descriptor with a valid header
  uint64_t sequence = 0;
  uint64_t count = 0;     // block images in the transaction
  bool complete = false;  // every image is there (the chained checksum matches): a mount
                          // replays it, and the counts below include it
};

struct FilesystemView {
  uint32_t version = 0;
  uint32_t block_size = 0;
  uint64_t block_count = 0;
  uint64_t inode_count = 0;
  uint64_t block_bitmap_start = 0;
  uint64_t block_bitmap_blocks = 0;
  uint64_t inode_bitmap_start = 0;
  uint64_t inode_bitmap_blocks = 0;
  uint64_t inode_table_start = 0;
  uint64_t inode_table_blocks = 0;
  uint64_t data_start = 0;
  JournalView journal;
  // Counted from the bitmaps as a mount does: data_blocks = block_count - data_start (statfs's
  // f_blocks); inodes 0 and 1 are never free. Unset if the geometry does not allow reading them.
  std::optional<uint64_t> free_blocks;
  std::optional<uint64_t> free_inodes;
  uint64_t orphan_head = 0;
  Uuid uuid{};
  std::string label;
  int64_t created_sec = 0;
  uint32_t dax_default = 0;  // 0 never, 1 always, 2 inode
  uint64_t checksum = 0;     // as stored
  bool checksum_ok = false;
  bool geometry_ok = false;
};

struct ImageInfo {
  std::string path;
  uint64_t file_size = 0;        // bytes mapped
  std::string backend;           // the filesystem holding the image ("tmpfs", "ext4", "devdax")
  std::optional<pid_t> held_by;  // a process holds the image's lock (a mount or a vpmfs tool)
  bool held_exclusive = false;   // ... for writing
  ImageHeaderView header;
  bool btt_found = false;
  uint64_t btt_sectors = 0;
  std::vector<BttArenaView> arenas;
  // What a mount's BTT recovery would do (an interrupted update to roll forward): not damage.
  std::vector<std::string> btt_notes;
  std::optional<FilesystemView> fs;
  // Damage found, each naming what and where. Empty: everything read is consistent.
  std::vector<std::string> problems;
};

// An image opened for inspection: read-only, unlocked.
class ImageInspector {
 public:
  // Fails only if the file cannot be mapped or holds no vpmfs image header (the magic).
  static Result<std::unique_ptr<ImageInspector>> open(const std::string& path);

  // Everything that can be read; what cannot is in problems.
  ImageInfo info();
  // The BTT the header names; an error if the header's layout cannot be trusted or no arena is
  // readable.
  Result<const BttInspector*> btt();

 private:
  ImageInspector() = default;
  std::unique_ptr<Region> region_;
  ImageHeaderView header_;
  std::optional<Result<BttInspector>> btt_;
};

}  // namespace vpmfs
