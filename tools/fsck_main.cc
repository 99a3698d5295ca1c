// fsck.vpmfs [-n|-y|-p|-a] [-f] IMAGE: checks a vpmfs image as the next mount will see it;
// repairs with -y; -p/-a (preen) only does what a mount would, when nothing is wrong.
// Exit codes as fsck(8): 0 clean, 1 errors corrected, 4 errors left uncorrected,
// 8 operational error, 16 usage error.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "vpmfs/fsck.h"

int main(int argc, char** argv) {
  CLI::App app{"Check and repair a vpmfs image", "fsck.vpmfs"};
  bool no_changes = false, yes = false, preen = false, force = false;
  std::string image;
  app.add_flag("-n", no_changes, "check only; open the image read-only and change nothing");
  app.add_flag("-y", yes, "repair everything that can be repaired");
  app.add_flag("-p,-a", preen,
               "preen, as at boot: do what the next mount would (roll the BTT forward, replay "
               "the journal) when nothing is wrong; leave any problem for -y (exit code 4)");
  app.add_flag("-f", force, "check even if the volume looks clean (vpmfs always checks fully)");
  app.add_option("IMAGE", image, "image file or device-dax node")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int rc = app.exit(e);
    return rc == 0 ? 0 : 16;
  }
  if (no_changes && (yes || preen)) {
    std::fprintf(stderr, "fsck.vpmfs: -n cannot be combined with -y or -p\n");
    return 16;
  }
  vpmfs::FsckOptions options;
  options.lock_wait_ms = 5000;  // `umount` returns before the daemon lets the image go
  options.repair = yes;
  options.preen = preen && !yes;
  auto report = vpmfs::fsck(image, options);
  if (!report) {
    std::fprintf(stderr, "fsck.vpmfs: %s: %s\n", image.c_str(),
                 report.status().to_string().c_str());
    return 8;
  }
  for (const auto& n : report->notes) std::printf("note: %s\n", n.c_str());
  for (const auto& p : report->problems) std::printf("problem: %s\n", p.c_str());
  for (const auto& r : report->repairs) std::printf("repaired: %s\n", r.c_str());
  for (const auto& r : report->remaining) std::printf("NOT REPAIRED: %s\n", r.c_str());
  if (report->clean()) {
    std::printf("%s: clean, %llu inodes, %llu blocks in use\n", image.c_str(),
                (unsigned long long)report->inodes, (unsigned long long)report->blocks);
  } else if (options.preen) {
    std::printf(
        "%s: UNEXPECTED INCONSISTENCY: %zu problems found, none repaired; run "
        "fsck.vpmfs -y\n",
        image.c_str(), report->problems.size());
  } else if (!options.repair) {
    std::printf("%s: %zu problems found; run fsck.vpmfs -y to repair\n", image.c_str(),
                report->problems.size());
  } else if (report->remaining.empty()) {
    std::printf("%s: %zu problems found and repaired\n", image.c_str(), report->problems.size());
  } else {
    std::printf("%s: %zu problems found, %zu not repaired\n", image.c_str(),
                report->problems.size(), report->remaining.size());
  }
  return report->exit_code();
}
