// Directory scaling: the per-operation cost of creates, lookups, create+unlink churn, readdir
// and the name-index build after a remount, in one directory of N = 1k, 10k, 100k and 1M
// entries. In a directory that stays fast at a million entries no operation costs more per
// entry as N grows, beyond the cache misses a larger working set brings.
//
// Each N gets its own image in /dev/shm, mounted forced-direct (as the volume tests do on
// tmpfs). The directory is filled with N files ("create" is the average over the fill), then:
//   lookup       stat by name of a random entry;
//   churn_fifo   unlink the oldest entry and create a new one (a mail or queue directory): the
//                free space is in the oldest blocks, the worst case for finding room;
//   churn_random unlink a random entry and create a new one;
//   readdir      the whole directory in 128-entry calls, as the kernel asks for it (per entry);
//   first_lookup remount, then one lookup, which builds the directory's name index.
// The summary gives µs/op per N, the heap the index build took, and the peak RSS (VmHWM; it
// includes the metadata cache and the mapped image pages the run touched). The whole run takes
// under a minute on two cores.
//
//   dir_bench [--quick | --max=N] [--benchmark_filter=...]
//   --quick: N up to 10,000 only; --max=N (or VPMFS_DIR_BENCH_MAX=N): N up to that.
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "vpmfs/fs.h"
#include "vpmfs/random.h"

namespace {

using Clock = std::chrono::steady_clock;

// Names as a mail or build directory has them: "entry-" and a number, 7 to 13 bytes.
class Name {
 public:
  explicit Name(uint64_t id) {
    std::memcpy(buf_, "entry-", 6);
    len_ = std::size_t(std::to_chars(buf_ + 6, buf_ + sizeof buf_, id).ptr - buf_);
  }
  std::string_view view() const { return {buf_, len_}; }

 private:
  char buf_[32];
  std::size_t len_;
};

const std::string g_image = "/dev/shm/vpmfs-dir-bench-" + std::to_string(::getpid()) + ".img";

void die(const std::string& what, const vpmfs::Status& s) {
  std::fprintf(stderr, "dir_bench: %s: %s\n", what.c_str(), s.to_string().c_str());
  std::remove(g_image.c_str());
  std::exit(1);
}

// One volume with one directory of n entries.
struct Dir {
  uint64_t n = 0;
  std::string path;
  std::unique_ptr<vpmfs::Volume> volume;
  uint64_t ino = 0;
  std::vector<uint64_t> live;  // ids of the entries, live[oldest] the oldest one
  uint64_t oldest = 0;
  uint64_t next_id = 0;

  void mount() {
    volume.reset();
    vpmfs::MountOptions m;
    m.mode = vpmfs::PersistMode::direct;
    m.force_persistent = true;
    auto v = vpmfs::Volume::mount(path, m);
    if (!v) die("mount " + path, v.status());
    volume = std::move(v.value());
  }
  void create(uint64_t id) {
    auto a = volume->mknod(ino, Name(id).view(), S_IFREG | 0644, 0, 0, 0);
    if (!a) die("create", a.status());
  }
  void unlink(uint64_t id) {
    if (auto s = volume->unlink(ino, Name(id).view()); !s) die("unlink", s);
  }
};

std::unique_ptr<Dir> g_dir;

Dir& fresh_dir(uint64_t n) {
  g_dir.reset();  // unmounts the previous one before its image goes
  auto d = std::make_unique<Dir>();
  d->n = n;
  d->path = g_image;
  std::remove(d->path.c_str());
  vpmfs::MkfsOptions o;
  // One inode per 4 KiB (the smallest ratio): room for n files and the churn's extras.
  o.size = std::max<uint64_t>(256 << 20, (n + n / 4 + 8192) * 4096);
  o.inode_ratio = 4096;
  o.force_persistent = true;
  if (auto s = vpmfs::Volume::mkfs(d->path, o); !s) die("mkfs", s);
  d->mount();
  auto a = d->volume->mkdir(vpmfs::kRootIno, "dir", 0755, 0, 0);
  if (!a) die("mkdir", a.status());
  d->ino = a->ino;
  d->live.reserve(n + n / 4);
  g_dir = std::move(d);
  return *g_dir;
}

Dir& dir(uint64_t n) {
  if (!g_dir || g_dir->n != n) {
    std::fprintf(stderr, "dir_bench: the create benchmark for %llu must run first\n",
                 (unsigned long long)n);
    std::exit(1);
  }
  return *g_dir;
}

uint64_t heap_bytes() {
  struct mallinfo2 m = mallinfo2();
  return m.uordblks + m.hblkhd;
}

// Peak resident set (VmHWM) in bytes.
uint64_t peak_rss() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10) << 10;
  }
  return 0;
}

void BM_Create(benchmark::State& state) {
  Dir& d = fresh_dir(uint64_t(state.range(0)));
  for (auto _ : state) {
    d.create(d.next_id);
    d.live.push_back(d.next_id++);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Lookup(benchmark::State& state) {
  Dir& d = dir(uint64_t(state.range(0)));
  vpmfs::SplitMix64 rng(1);
  for (auto _ : state) {
    uint64_t id = d.live[d.oldest + rng.below(d.live.size() - d.oldest)];
    auto a = d.volume->lookup(d.ino, Name(id).view());
    if (!a) die("lookup", a.status());
    benchmark::DoNotOptimize(a->ino);
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_ChurnFifo(benchmark::State& state) {
  Dir& d = dir(uint64_t(state.range(0)));
  for (auto _ : state) {
    d.unlink(d.live[d.oldest++]);
    d.create(d.next_id);
    d.live.push_back(d.next_id++);
  }
  // Compact the FIFO so the random churn picks among live entries only.
  d.live.erase(d.live.begin(), d.live.begin() + std::ptrdiff_t(d.oldest));
  d.oldest = 0;
  state.SetItemsProcessed(state.iterations());
}

void BM_ChurnRandom(benchmark::State& state) {
  Dir& d = dir(uint64_t(state.range(0)));
  vpmfs::SplitMix64 rng(2);
  for (auto _ : state) {
    uint64_t& slot = d.live[rng.below(d.live.size())];
    d.unlink(slot);
    d.create(d.next_id);
    slot = d.next_id++;
  }
  state.SetItemsProcessed(state.iterations());
}

void BM_Readdir(benchmark::State& state) {
  Dir& d = dir(uint64_t(state.range(0)));
  uint64_t entries = 0;
  for (auto _ : state) {
    uint64_t cookie = 0;
    for (bool more = true; more;) {
      int taken = 0;
      more = false;
      auto s = d.volume->readdir(d.ino, cookie, [&](const vpmfs::DirEntry& e) {
        if (taken == 128) {
          more = true;  // the reply buffer is full: the kernel comes back for the rest
          return false;
        }
        ++taken;
        cookie = e.next_offset;
        return true;
      });
      if (!s) die("readdir", s);
      entries += uint64_t(taken);
    }
  }
  if (entries != state.iterations() * (d.live.size() - d.oldest + 2)) {
    state.SkipWithError("readdir returned the wrong number of entries");
  }
  state.SetItemsProcessed(int64_t(entries));
}

// The heap the last index build took, besides the directory blocks it read into the metadata
// cache.
uint64_t g_index_heap = 0;

void BM_FirstLookup(benchmark::State& state) {
  Dir& d = dir(uint64_t(state.range(0)));
  uint64_t id = d.live[d.oldest + (d.live.size() - d.oldest) / 2];
  for (auto _ : state) {
    d.mount();
    uint64_t heap = heap_bytes();
    auto start = Clock::now();
    auto a = d.volume->lookup(d.ino, Name(id).view());
    state.SetIterationTime(std::chrono::duration<double>(Clock::now() - start).count());
    if (!a) die("first lookup", a.status());
    uint64_t grown = heap_bytes() - heap;
    uint64_t blocks = d.volume->getattr(d.ino)->size;
    g_index_heap = grown > blocks ? grown - blocks : 0;
  }
  uint64_t entries = d.live.size() - d.oldest;
  state.counters["index_heap_MiB"] = double(g_index_heap) / (1 << 20);
  state.counters["index_bytes_per_entry"] = double(g_index_heap) / double(entries);
  state.counters["peak_rss_MiB"] = double(peak_rss()) / (1 << 20);
  state.SetItemsProcessed(state.iterations() * int64_t(entries));
}

// Best figures per benchmark name, for the summary.
struct Figure {
  double seconds_per_iteration = 0;
  double items_per_second = 0;
  double index_heap_mib = 0;
  double index_bytes_per_entry = 0;
  double peak_rss_mib = 0;
};
std::map<std::string, Figure> g_best;

class Reporter : public benchmark::ConsoleReporter {
 public:
  Reporter() : ConsoleReporter(isatty(STDOUT_FILENO) ? OO_Defaults : OO_Tabular) {}
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.run_type != Run::RT_Iteration || run.iterations == 0) continue;
      Figure f;
      f.seconds_per_iteration = run.real_accumulated_time / double(run.iterations);
      if (auto it = run.counters.find("items_per_second"); it != run.counters.end()) {
        f.items_per_second = it->second.value;
      }
      if (auto it = run.counters.find("index_heap_MiB"); it != run.counters.end()) {
        f.index_heap_mib = it->second.value;
      }
      if (auto it = run.counters.find("index_bytes_per_entry"); it != run.counters.end()) {
        f.index_bytes_per_entry = it->second.value;
      }
      if (auto it = run.counters.find("peak_rss_MiB"); it != run.counters.end()) {
        f.peak_rss_mib = it->second.value;
      }
      std::string name = run.run_name.function_name + "/" + run.run_name.args;
      Figure& best = g_best[name];
      if (best.items_per_second < f.items_per_second) best = f;
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

void summary(const std::vector<int64_t>& sizes) {
  auto fig = [](const char* bench, int64_t n) {
    return g_best[std::string(bench) + "/" + std::to_string(n)];
  };
  auto cell = [](const Figure& f, int decimals = 2) {
    char s[32];
    double us = f.items_per_second > 0 ? 1e6 / f.items_per_second : 0;
    std::snprintf(s, sizeof s, "%.*f (%.0f)", decimals, us, f.items_per_second);
    return std::string(s);
  };
  std::printf("\nµs per operation (operations per second) in one directory of N entries\n");
  std::printf("%9s %17s %17s %17s %17s %19s %13s %17s %9s\n", "N", "create", "lookup", "churn_fifo",
              "churn_random", "readdir (entries)", "first_lookup", "index heap", "peak RSS");
  for (int64_t n : sizes) {
    Figure first = fig("first_lookup", n);
    std::printf("%9lld %17s %17s %17s %17s %19s %10.1f ms %8.1f MiB %3.0f B/e %5.0f MiB\n",
                (long long)n, cell(fig("create", n)).c_str(), cell(fig("lookup", n)).c_str(),
                cell(fig("churn_fifo", n)).c_str(), cell(fig("churn_random", n)).c_str(),
                cell(fig("readdir", n), 3).c_str(), first.seconds_per_iteration * 1e3,
                first.index_heap_mib, first.index_bytes_per_entry, first.peak_rss_mib);
  }
  std::printf(
      "churn: one unlink and one create. first_lookup: after a remount, the lookup that builds "
      "the name index. index heap: what that build allocated besides the directory blocks it "
      "cached (B/e: per entry). peak RSS: VmHWM so far, with the metadata cache and the image "
      "pages touched.\n");
}

}  // namespace

int main(int argc, char** argv) {
  int64_t max_n = 1000000;
  if (const char* env = std::getenv("VPMFS_DIR_BENCH_MAX")) max_n = std::atoll(env);
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick") {
      max_n = 10000;
    } else if (a.rfind("--max=", 0) == 0) {
      max_n = std::atoll(a.c_str() + 6);
    } else {
      args.push_back(argv[i]);
    }
  }
  int count = int(args.size());
  benchmark::Initialize(&count, args.data());

  std::vector<int64_t> sizes;
  for (int64_t n = 1000; n <= max_n; n *= 10) sizes.push_back(n);
  // In this order for each N: the fill builds the directory the others use.
  for (int64_t n : sizes) {
    benchmark::RegisterBenchmark("create", BM_Create)->Arg(n)->Iterations(n)->UseRealTime();
    benchmark::RegisterBenchmark("lookup", BM_Lookup)->Arg(n)->MinTime(0.3)->UseRealTime();
    benchmark::RegisterBenchmark("churn_fifo", BM_ChurnFifo)->Arg(n)->MinTime(0.5)->UseRealTime();
    benchmark::RegisterBenchmark("churn_random", BM_ChurnRandom)
        ->Arg(n)
        ->MinTime(0.5)
        ->UseRealTime();
    benchmark::RegisterBenchmark("readdir", BM_Readdir)->Arg(n)->MinTime(0.3)->UseRealTime();
    benchmark::RegisterBenchmark("first_lookup", BM_FirstLookup)
        ->Arg(n)
        ->Iterations(n >= 1000000 ? 2 : 3)
        ->UseManualTime();
  }
  Reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  summary(sizes);
  g_dir.reset();
  std::remove(g_image.c_str());
  return 0;
}
