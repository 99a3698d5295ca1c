#include "vpmfs/persist.h"

#include <cstring>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace vpmfs {
namespace {

TEST(Persist, ChoosesAFlushInstructionFromCpuid) {
  std::string name = pmem::to_string(pmem::flush_instruction());
  EXPECT_TRUE(name == "clwb" || name == "clflushopt" || name == "clflush") << name;
}

TEST(Persist, NonTemporalCopyMatchesMemcpyAtEveryAlignment) {
  std::vector<unsigned char> src(9000), dst(9100), want(9100);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<unsigned char>(i * 31 + 7);
  for (std::size_t dst_off : {0, 1, 8, 63, 64, 65}) {
    for (std::size_t len : {0, 1, 63, 64, 65, 127, 128, 129, 4096, 4097, 8191}) {
      std::memset(dst.data(), 0x5A, dst.size());
      std::memset(want.data(), 0x5A, want.size());
      std::memcpy(want.data() + dst_off, src.data() + 3, len);
      pmem::copy_nt(dst.data() + dst_off, src.data() + 3, len);
      pmem::fence();
      ASSERT_EQ(dst, want) << "offset " << dst_off << " length " << len;
    }
  }
}

TEST(Persist, FlushAndPersistLeaveDataIntact) {
  std::vector<char> buf(4096 + 64, 'q');
  pmem::flush(buf.data() + 5, 4000);
  pmem::persist(buf.data(), buf.size());
  pmem::persist(buf.data(), 0);
  for (char c : buf) ASSERT_EQ(c, 'q');
}

}  // namespace
}  // namespace vpmfs
