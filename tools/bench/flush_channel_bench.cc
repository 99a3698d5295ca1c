// Flush channel throughput and latency against plain fdatasync, on an image on the root disk.
//
//   flush_channel_bench [--benchmark_min_time=...] [--image=/tmp/vpmfs-bench-flush.img]
//
// Each request dirties one page of its submitter, persists it and waits for its flush request.
// Printed per run: flushes/s, requests per device flush, mean request latency; and at the end the
// goals of issue 2 (16 submitters: >= 8 requests per flush, latency <= 2x one fdatasync).
#include <fcntl.h>
#include <unistd.h>

#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <map>
#include <string>

#include "vpmfs/region.h"

namespace {

std::string g_image = "/tmp/vpmfs-bench-flush.img";
std::unique_ptr<vpmfs::Region> g_region;
double g_fdatasync_us = 0;
std::map<int, std::pair<double, double>> g_channel;  // threads -> (latency us, req per flush)

vpmfs::Region& region() {
  if (!g_region) {
    std::remove(g_image.c_str());
    vpmfs::RegionOptions o;
    o.create_size = 64 << 20;
    o.mode = vpmfs::PersistMode::writeback;
    auto r = vpmfs::Region::open(g_image, o);
    if (!r) {
      std::fprintf(stderr, "cannot open %s: %s\n", g_image.c_str(), r.status().to_string().c_str());
      std::exit(1);
    }
    g_region = std::move(r.value());
    // Allocate every page once so timing does not include block allocation.
    for (uint64_t off = 0; off < g_region->size(); off += 4096) g_region->write(off, "w", 1);
    g_region->persist(0, g_region->size());
    (void)g_region->flush_channel().wait();
  }
  return *g_region;
}

// The reference: what one thread pays for dirtying a page and calling fdatasync itself.
void BM_PlainFdatasync(benchmark::State& state) {
  vpmfs::Region& r = region();
  int fd = ::open(g_image.c_str(), O_RDWR | O_CLOEXEC);
  uint64_t i = 0;
  for (auto _ : state) {
    r.write(0, &i, sizeof i);
    ++i;
    if (::fdatasync(fd) != 0) state.SkipWithError("fdatasync failed");
  }
  ::close(fd);
  state.SetItemsProcessed(state.iterations());
}

void BM_FlushChannel(benchmark::State& state) {
  vpmfs::Region& r = region();
  auto& channel = r.flush_channel();
  auto before = channel.stats();
  uint64_t off = uint64_t(state.thread_index()) * 4096;
  uint64_t i = 0;
  double total_us = 0;
  auto started = std::chrono::steady_clock::now();
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    r.write(off, &i, sizeof i);
    r.persist(off, sizeof i);
    ++i;
    std::promise<void> done;
    channel.submit([&done](const vpmfs::Status&) { done.set_value(); });
    done.get_future().wait();
    total_us +=
        std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  }
  double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  auto after = channel.stats();
  double latency = state.iterations() ? total_us / double(state.iterations()) : 0;
  state.counters["latency_us"] = benchmark::Counter(latency, benchmark::Counter::kAvgThreads);
  if (state.thread_index() == 0) {
    double flushes = double(after.device_flushes - before.device_flushes);
    double served = double(after.requests_flushed - before.requests_flushed);
    double per_flush = flushes > 0 ? served / flushes : 0;
    state.counters["flushes_per_s"] = flushes / seconds;
    state.counters["req_per_flush"] = per_flush;
    state.counters["device_us"] =
        flushes > 0 ? double(after.flush_ns - before.flush_ns) / flushes / 1000 : 0;
  }
  state.SetItemsProcessed(state.iterations());
}

BENCHMARK(BM_PlainFdatasync)->UseRealTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_FlushChannel)
    ->Threads(1)
    ->Threads(4)
    ->Threads(16)
    ->UseRealTime()
    ->Unit(benchmark::kMicrosecond);

// Keeps the figures of the final run of each benchmark for the summary.
class Reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& run : runs) {
      if (run.benchmark_name().rfind("BM_PlainFdatasync", 0) == 0 && run.iterations > 0) {
        g_fdatasync_us = run.GetAdjustedRealTime();
      }
      if (run.benchmark_name().rfind("BM_FlushChannel", 0) == 0 && run.iterations > 0) {
        g_channel[int(run.threads)] = {run.counters.at("latency_us").value,
                                       run.counters.at("req_per_flush").value};
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }
};

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--image=", 8) == 0) g_image = argv[i] + 8;
  }
  benchmark::Initialize(&argc, argv);
  Reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  if (g_fdatasync_us > 0 && g_channel.count(16)) {
    auto [latency, per_flush] = g_channel[16];
    std::printf("\nplain fdatasync: %.1f us per call\n", g_fdatasync_us);
    for (auto& [threads, figures] : g_channel) {
      std::printf(
          "flush channel, %2d submitters: %.1f us per request (%.2fx fdatasync), "
          "%.2f requests per device flush\n",
          threads, figures.first, figures.first / g_fdatasync_us, figures.second);
    }
    std::printf(
        "goal (16 submitters): >= 8 requests per flush: %s (%.2f); latency <= 2x "
        "fdatasync: %s (%.2fx)\n",
        per_flush >= 8 ? "met" : "MISSED", per_flush,
        latency <= 2 * g_fdatasync_us ? "met" : "MISSED", latency / g_fdatasync_us);
  }
  g_region.reset();
  std::remove(g_image.c_str());
  return 0;
}
