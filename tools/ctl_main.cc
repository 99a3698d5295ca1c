// vpmfs-ctl: looks at vpmfs images and mounts, in the spirit of ndctl list and pmempool info.
//
//   vpmfs-ctl info IMAGE [--json]                         header, BTT arenas, filesystem summary
//   vpmfs-ctl dump IMAGE --lba FIRST[-LAST] [--arena N] [--json]   map entries and flog lanes
//   vpmfs-ctl status MOUNTPOINT [--json]                  what the daemon of a mount reports
//
// info and dump open the image read-only and take no lock, so they work on a mounted image
// (seeing what the media holds at that moment). Exit codes: 0 done, 1 an error or damage found,
// 2 usage error.
#include <sys/xattr.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "vpmfs/btt_inspect.h"
#include "vpmfs/info.h"

namespace {

using Json = nlohmann::ordered_json;
using vpmfs::hex_string;
using vpmfs::uuid_string;

constexpr int kExitError = 1;
constexpr int kExitUsage = 2;
constexpr uint64_t kMaxDumpLbas = 1'000'000;
constexpr const char* kStatusXattr = "user.vpmfs.status";

int fail(const std::string& message) {
  std::fprintf(stderr, "vpmfs-ctl: %s\n", message.c_str());
  return kExitError;
}

// Labels come from media and may hold any bytes: invalid UTF-8 becomes U+FFFD rather than an
// exception.
std::string pretty(const Json& doc) {
  return doc.dump(2, ' ', false, Json::error_handler_t::replace);
}

// --- human output ------------------------------------------------------------------------------

std::string human_size(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = double(bytes);
  int u = 0;
  for (; v >= 1024 && u < 5; ++u) v /= 1024;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f %s", v, units[u]);
  return buf;
}

std::string utc_time(int64_t sec) {
  time_t t = time_t(sec);
  struct tm tm {};
  char buf[64];
  if (gmtime_r(&t, &tm) == nullptr || std::strftime(buf, sizeof buf, "%F %T UTC", &tm) == 0) {
    return std::to_string(sec);
  }
  return std::string(buf) + " (" + std::to_string(sec) + ")";
}

using Fields = std::vector<std::pair<std::string, std::string>>;

// "  key:   value" lines, the values of a section aligned.
void print_fields(const Fields& fields) {
  std::size_t width = 0;
  for (const auto& [k, v] : fields) width = std::max(width, k.size());
  for (const auto& [k, v] : fields) {
    std::printf("  %s:%*s %s\n", k.c_str(), int(width - k.size()), "", v.c_str());
  }
}

std::string words(std::string key) {
  for (char& c : key) c = c == '_' ? ' ' : c;
  return key;
}

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// A JSON value for people; the key says how a number reads best.
std::string human_value(const std::string& key, const Json& v) {
  if (v.is_null()) return "-";
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_string()) {
    auto s = v.get<std::string>();
    for (char& c : s) c = (unsigned char)c < 0x20 || c == 0x7f ? '?' : c;  // no terminal codes
    return s.empty() ? "(none)" : s;
  }
  if (v.is_number_unsigned() || v.is_number_integer()) {
    if (key == "created") return utc_time(v.get<int64_t>());
    uint64_t n = v.get<uint64_t>();
    if (ends_with(key, "offset") || ends_with(key, "off")) return hex_string(n);
    if (ends_with(key, "size") && n >= (1u << 20)) {
      return std::to_string(n) + " (" + human_size(n) + ")";
    }
    return std::to_string(n);
  }
  if (v.is_array()) {
    std::string out;
    for (const auto& e : v) out += (out.empty() ? "" : ", ") + human_value(key, e);
    return out.empty() ? "(none)" : out;
  }
  return v.dump();
}

// Renders a JSON document as sections of aligned "key: value" lines: each top-level member is
// a section; nested objects are flattened ("journal start"), arrays of objects become sections
// of their own ("btt arena 0"), arrays of strings one line each. The same document is what
// --json prints, so both outputs always carry the same fields.
void print_section(const std::string& title, const Json& obj) {
  std::printf("%s\n", title.c_str());
  if (obj.is_array()) {
    for (const auto& line : obj) std::printf("  %s\n", human_value("", line).c_str());
    if (obj.empty()) std::printf("  none\n");
    return;
  }
  if (!obj.is_object()) {
    std::printf("  %s\n", human_value(title, obj).c_str());
    return;
  }
  Fields fields;
  std::vector<std::pair<std::string, const Json*>> subsections;
  auto add = [&](auto&& self, const std::string& prefix, const Json& o) -> void {
    for (const auto& [k, v] : o.items()) {
      std::string key = prefix.empty() ? words(k) : prefix + " " + words(k);
      if (v.is_object()) {
        self(self, key, v);
      } else if (v.is_array() && !v.empty() && v.front().is_object()) {
        subsections.emplace_back(key, &v);
      } else if (v.is_array() && !v.empty() && v.front().is_string()) {
        for (const auto& line : v) fields.emplace_back(key, human_value(k, line));
      } else {
        fields.emplace_back(key, human_value(k, v));
      }
    }
  };
  add(add, "", obj);
  print_fields(fields);
  for (const auto& [key, array] : subsections) {
    std::string singular = ends_with(key, "s") ? key.substr(0, key.size() - 1) : key;
    int i = 0;
    for (const auto& item : *array) {
      print_section(title + " " + singular + " " + std::to_string(i++), item);
    }
  }
}

void print_document(const Json& doc) {
  for (const auto& [k, v] : doc.items()) print_section(words(k), v);
}

// --- info --------------------------------------------------------------------------------------

Json copy_json(const vpmfs::BttInfoCopy& c) {
  return Json{{"offset", c.offset},
              {"signature", c.signature},
              {"checksum", hex_string(c.checksum)},
              {"checksum_ok", c.checksum_ok},
              {"valid", c.valid()},
              {"problem", c.problem}};
}

Json arena_json(const vpmfs::BttArenaView& a) {
  Json j;
  j["index"] = a.index;
  j["usable"] = a.usable;
  j["offset"] = a.info.offset;
  if (a.usable) {
    const vpmfs::BttArenaInfo& i = a.info;
    j["size"] = i.size;
    j["first_lba"] = a.first_lba;
    j["uuid"] = uuid_string(i.uuid);
    j["parent_uuid"] = uuid_string(i.parent_uuid);
    j["version"] = std::to_string(i.version_major) + "." + std::to_string(i.version_minor);
    j["external_lbasize"] = i.external_lbasize;
    j["external_nlba"] = i.external_nlba;
    j["internal_lbasize"] = i.internal_lbasize;
    j["internal_nlba"] = i.internal_nlba;
    j["nfree"] = i.nfree;
    j["infosize"] = a.infosize;
    j["flags"] = i.flags;
    j["error_flag"] = a.error_flag;
    // As the info block stores them: relative to the arena.
    j["dataoff"] = i.dataoff - i.offset;
    j["mapoff"] = i.mapoff - i.offset;
    j["logoff"] = i.logoff - i.offset;
    j["info2off"] = i.info2off - i.offset;
    j["nextoff"] = a.nextoff;
    j["flog_slots"] = {i.log_index[0], i.log_index[1]};
    j["flog_problem"] = a.flog_problem;
    j["info_in_use"] = a.from_backup ? "backup" : "primary";
    j["backup_matches_primary"] = a.backup_matches;
  }
  j["primary"] = copy_json(a.primary);
  j["backup"] = copy_json(a.backup);
  return j;
}

const char* dax_name(uint32_t dax) {
  switch (dax) {
    case 0:
      return "never";
    case 1:
      return "always";
    case 2:
      return "inode";
  }
  return "unknown";
}

Json optional_json(const std::optional<uint64_t>& v) {
  return v ? Json(*v) : Json(nullptr);
}

Json info_json(const vpmfs::ImageInfo& info) {
  const vpmfs::ImageHeaderView& h = info.header;
  Json doc;
  doc["image"] = {{"path", info.path},
                  {"file_size", info.file_size},
                  {"backend", info.backend},
                  {"in_use", info.held_by.has_value()},
                  {"held_by_pid", info.held_by ? Json(*info.held_by) : Json(nullptr)},
                  {"held_for", !info.held_by         ? ""
                               : info.held_exclusive ? "writing"
                                                     : "reading"}};
  doc["header"] = {{"version", h.version},
                   {"header_size", h.header_size},
                   {"image_size", h.image_size},
                   {"uuid", uuid_string(h.uuid)},
                   {"label", h.label},
                   {"created", h.created_sec},
                   {"sector_size", h.sector_size},
                   {"lanes", h.lanes},
                   {"intent_log", {{"offset", h.intent_log_offset}, {"size", h.intent_log_size}}},
                   {"kill_log", {{"offset", h.kill_log_offset}, {"size", h.kill_log_size}}},
                   {"btt", {{"offset", h.btt_offset}, {"size", h.btt_size}}},
                   {"checksum", hex_string(h.checksum)},
                   {"checksum_ok", h.checksum_ok},
                   {"layout_ok", h.layout_ok}};
  if (info.btt_found) {
    Json arenas = Json::array();
    for (const auto& a : info.arenas) arenas.push_back(arena_json(a));
    bool readable = !info.arenas.empty() && info.arenas.front().usable;
    doc["btt"] = {
        {"sector_size", readable ? Json(info.arenas.front().info.external_lbasize) : Json(nullptr)},
        {"sectors", info.btt_sectors},
        {"arena_count", info.arenas.size()},
        {"notes", info.btt_notes},
        {"arenas", arenas}};
  } else {
    doc["btt"] = nullptr;
  }
  if (info.fs) {
    const vpmfs::FilesystemView& f = *info.fs;
    uint64_t data_blocks = f.block_count > f.data_start ? f.block_count - f.data_start : 0;
    Json used = f.free_blocks && *f.free_blocks <= data_blocks ? Json(data_blocks - *f.free_blocks)
                                                               : Json(nullptr);
    doc["filesystem"] = {
        {"version", f.version},
        {"block_size", f.block_size},
        {"block_count", f.block_count},
        {"data_start", f.data_start},
        {"data_blocks", data_blocks},
        {"free_blocks", optional_json(f.free_blocks)},
        {"used_blocks", used},
        {"inode_count", f.inode_count},
        {"free_inodes", optional_json(f.free_inodes)},
        {"label", f.label},
        {"uuid", uuid_string(f.uuid)},
        {"created", f.created_sec},
        {"dax_default", dax_name(f.dax_default)},
        {"orphan_head", f.orphan_head},
        {"journal",
         {{"start", f.journal.start},
          {"blocks", f.journal.blocks},
          {"transaction", f.journal.transaction},
          {"sequence", f.journal.sequence},
          {"images", f.journal.count},
          {"complete", f.journal.complete}}},
        {"block_bitmap", {{"start", f.block_bitmap_start}, {"blocks", f.block_bitmap_blocks}}},
        {"inode_bitmap", {{"start", f.inode_bitmap_start}, {"blocks", f.inode_bitmap_blocks}}},
        {"inode_table", {{"start", f.inode_table_start}, {"blocks", f.inode_table_blocks}}},
        {"checksum", hex_string(f.checksum)},
        {"checksum_ok", f.checksum_ok},
        {"geometry_ok", f.geometry_ok}};
  } else {
    doc["filesystem"] = nullptr;
  }
  doc["problems"] = info.problems;
  return doc;
}

int cmd_info(const std::string& image, bool json) {
  auto inspector = vpmfs::ImageInspector::open(image);
  if (!inspector) return fail(inspector.status().message());
  vpmfs::ImageInfo info = (*inspector)->info();
  Json doc = info_json(info);
  if (json) {
    std::printf("%s\n", pretty(doc).c_str());
  } else {
    // Sections that could not be read say so instead of vanishing.
    for (const char* key : {"btt", "filesystem"}) {
      if (doc[key].is_null()) doc[key] = "not readable (see problems)";
    }
    print_document(doc);
  }
  for (const auto& p : info.problems)
    std::fprintf(stderr, "vpmfs-ctl: %s: %s\n", image.c_str(), p.c_str());
  return info.problems.empty() ? 0 : kExitError;
}

// --- dump --------------------------------------------------------------------------------------

std::optional<uint64_t> parse_number(const std::string& text) {
  if (text.empty() || text[0] == '-' || text[0] == '+') return std::nullopt;
  bool hex = text.size() > 2 && text[0] == '0' && (text[1] == 'x' || text[1] == 'X');
  errno = 0;
  char* end = nullptr;
  unsigned long long v = std::strtoull(text.c_str(), &end, hex ? 16 : 10);
  if (errno != 0 || end == text.c_str() || *end != '\0') return std::nullopt;
  return uint64_t(v);
}

const char* map_state(const vpmfs::BttMapView& m) {
  if (m.identity()) return "identity";
  if (m.zero && m.error) return "normal";
  return m.zero ? "zero" : "error";
}

int cmd_dump(const std::string& image, const std::string& range, std::optional<int> arena,
             bool json) {
  auto dash = range.find('-', 1);
  auto first = parse_number(range.substr(0, dash));
  auto last = dash == std::string::npos ? first : parse_number(range.substr(dash + 1));
  if (!first || !last || *last < *first) {
    std::fprintf(stderr, "vpmfs-ctl: --lba %s: expected FIRST or FIRST-LAST, FIRST <= LAST\n",
                 range.c_str());
    return kExitUsage;
  }
  if (*last - *first >= kMaxDumpLbas) {
    std::fprintf(stderr,
                 "vpmfs-ctl: --lba %s: refusing to dump %" PRIu64 " LBAs; at most %" PRIu64
                 " at a time\n",
                 range.c_str(), *last - *first + 1, kMaxDumpLbas);
    return kExitUsage;
  }
  auto inspector = vpmfs::ImageInspector::open(image);
  if (!inspector) return fail(inspector.status().message());
  auto btt = (*inspector)->btt();
  if (!btt) return fail(image + ": " + btt.status().message());
  const vpmfs::BttInspector& in = **btt;

  uint64_t base = 0;  // namespace LBA of premap 0 of the chosen arena
  if (arena) {
    const auto& arenas = in.arenas();
    if (*arena < 0 || std::size_t(*arena) >= arenas.size() || !arenas[*arena].usable) {
      return fail(image + ": no readable arena " + std::to_string(*arena));
    }
    const auto& a = arenas[*arena];
    if (*last >= a.info.external_nlba) {
      return fail(image + ": arena " + std::to_string(*arena) + " has " +
                  std::to_string(a.info.external_nlba) + " sectors (premap LBAs 0-" +
                  std::to_string(a.info.external_nlba - 1) + ")");
    }
    base = a.first_lba;
  } else if (*last >= in.sector_count()) {
    return fail(image + ": LBA " + std::to_string(*last) + " is beyond the " +
                std::to_string(in.sector_count()) + " sectors of the BTT");
  }

  Json lbas = Json::array();
  std::vector<int> touched;
  for (uint64_t lba = base + *first; lba <= base + *last; ++lba) {
    auto m = in.map_entry(lba);
    if (!m) return fail(image + ": " + m.status().message());
    lbas.push_back({{"lba", m->lba},
                    {"arena", m->arena},
                    {"premap", m->premap},
                    {"raw", m->raw},
                    {"raw_hex", hex_string(m->raw)},
                    {"block", m->block},
                    {"zero", m->zero},
                    {"error", m->error},
                    {"state", map_state(*m)},
                    {"in_range", m->in_range}});
    if (touched.empty() || touched.back() != m->arena) touched.push_back(m->arena);
  }
  Json arenas = Json::array();
  for (int index : touched) {
    auto lanes = in.lanes(index);
    if (!lanes) return fail(image + ": " + lanes.status().message());
    const auto& a = in.arenas()[index];
    Json lj = Json::array();
    for (const auto& lane : *lanes) {
      Json slots = Json::array();
      for (const auto& s : lane.slot) {
        slots.push_back(
            {{"lba", s.lba}, {"old_map", s.old_map}, {"new_map", s.new_map}, {"seq", s.seq}});
      }
      lj.push_back({{"lane", lane.lane},
                    {"current", lane.current < 0 ? Json(nullptr) : Json(lane.current)},
                    {"slots", slots}});
    }
    arenas.push_back({{"index", index},
                      {"flog_slots", {a.info.log_index[0], a.info.log_index[1]}},
                      {"flog_problem", a.flog_problem},
                      {"lanes", lj}});
  }

  if (json) {
    Json doc = {{"image", image}, {"lbas", lbas}, {"arenas", arenas}};
    std::printf("%s\n", pretty(doc).c_str());
    return 0;
  }
  std::printf("%-12s %-5s %-10s %-10s %-10s %s\n", "lba", "arena", "premap", "map entry", "block",
              "state");
  for (const auto& m : lbas) {
    std::printf("%-12" PRIu64 " %-5d %-10u 0x%08x %-10u %s%s\n", m["lba"].get<uint64_t>(),
                m["arena"].get<int>(), m["premap"].get<uint32_t>(), m["raw"].get<uint32_t>(),
                m["block"].get<uint32_t>(), m["state"].get<std::string>().c_str(),
                m["in_range"].get<bool>() ? "" : " (beyond the arena's blocks)");
  }
  // old_map keeps the E bit of a sector that was in the error state.
  auto block = [](uint32_t v) {
    return std::to_string(v & 0x3FFFFFFFu) + ((v & 0x40000000u) != 0 ? "+E" : "");
  };
  for (const auto& a : arenas) {
    const std::string& problem = a["flog_problem"].get_ref<const std::string&>();
    std::printf("\narena %d flog, slots %d and %d%s%s\n", a["index"].get<int>(),
                a["flog_slots"][0].get<int>(), a["flog_slots"][1].get<int>(),
                problem.empty() ? "" : ": ", problem.c_str());
    std::printf("%-6s %-7s | %-10s %-10s %-10s %-3s | %-10s %-10s %-10s %s\n", "lane", "current",
                "lba", "old_map", "new_map", "seq", "lba", "old_map", "new_map", "seq");
    for (const auto& lane : a["lanes"]) {
      const Json& cur = lane["current"];
      std::string current = cur.is_null() ? "none" : "slot " + std::to_string(cur.get<int>());
      std::string line = std::to_string(lane["lane"].get<uint32_t>());
      line.resize(6, ' ');
      line += " " + current;
      line.resize(14, ' ');
      for (const auto& s : lane["slots"]) {
        char buf[80];
        std::snprintf(buf, sizeof buf, " | %-10u %-10s %-10s %-3u", s["lba"].get<uint32_t>(),
                      block(s["old_map"].get<uint32_t>()).c_str(),
                      block(s["new_map"].get<uint32_t>()).c_str(), s["seq"].get<uint32_t>());
        line += buf;
      }
      while (!line.empty() && line.back() == ' ') line.pop_back();
      std::printf("%s\n", line.c_str());
    }
  }
  return 0;
}

// --- status ------------------------------------------------------------------------------------

// A member of the daemon's status as text; absent or of another type: "?".
std::string member(const Json& j, const char* key) {
  if (!j.is_object() || !j.contains(key)) return "?";
  const Json& v = j[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  if (v.is_number_float()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", v.get<double>());
    return buf;
  }
  if (v.is_number()) return std::to_string(v.get<int64_t>());
  return "?";
}

bool flag(const Json& j, const char* key) {
  return j.is_object() && j.contains(key) && j[key].is_boolean() && j[key].get<bool>();
}

std::string persistence_words(const std::string& mode) {
  if (mode == "direct") {
    return "direct (persistent memory: stores are durable after cache write-back; MAP_SYNC "
           "granted)";
  }
  if (mode == "writeback") {
    return "writeback (virtio-pmem style: durable after a flush request to the host; MAP_SYNC "
           "refused)";
  }
  if (mode == "unsafe") return "unsafe (NOTHING is guaranteed durable)";
  return mode;
}

int cmd_status(const std::string& mountpoint, bool json) {
  std::string value;
  for (;;) {
    ssize_t size = ::getxattr(mountpoint.c_str(), kStatusXattr, nullptr, 0);
    if (size >= 0) {
      value.resize(std::size_t(size));
      size = ::getxattr(mountpoint.c_str(), kStatusXattr, value.data(), value.size());
    }
    if (size >= 0) {
      value.resize(std::size_t(size));
      break;
    }
    if (errno == ERANGE) continue;  // it grew between the two calls
    if (errno == ENODATA || errno == ENOTSUP) {
      return fail(mountpoint + " is not a vpmfs mount (no " + kStatusXattr + ")");
    }
    return fail("cannot read the status of " + mountpoint + ": " + std::strerror(errno));
  }
  Json status = Json::parse(value, nullptr, /*allow_exceptions=*/false);
  if (status.is_discarded() || !status.is_object()) {
    return fail(mountpoint + ": the daemon's status is not a JSON object: " + value);
  }
  if (json) {
    std::printf("%s\n", pretty(status).c_str());
    return 0;
  }
  std::string state = flag(status, "failed")      ? "FAILED: read-only after a failed flush"
                      : flag(status, "read_only") ? "read-only"
                                                  : "read-write";
  std::string last_error = member(status, "last_error");
  Fields f = {{"mount", mountpoint},
              {"image", member(status, "image")},
              {"persistence", persistence_words(member(status, "mode"))},
              {"why", member(status, "mode_reason")},
              {"sync_dax", member(status, "sync_dax")},
              {"dax", member(status, "dax")},
              {"state", state},
              {"last error", last_error.empty() ? "none" : last_error}};
  if (std::string memory = member(status, "memory"); !memory.empty() && memory != "?") {
    f.emplace_back("image memory", memory);
  }
  if (flag(status, "writeback_cache")) {
    f.emplace_back("write cache",
                   "the kernel's write-back cache (a killed daemon loses writes "
                   "not yet written back)");
  }
  if (flag(status, "sync")) {
    f.emplace_back("sync", "every change durable when its call returns (fsync owes nothing)");
  }
  if (status.contains("commits") && status["commits"].is_object()) {
    const Json& c = status["commits"];
    f.emplace_back("commits", member(c, "commits") + " (" + member(c, "syncs") + " fsyncs, " +
                                  member(c, "syncs_per_commit") + " per commit; " +
                                  member(c, "journal_commits") + " wrote the journal)");
    f.emplace_back("commit time", member(c, "commit_us") + " us each, then " +
                                      member(c, "answer_us") + " us answering its fsyncs and " +
                                      member(c, "gather_us") + " us gathering the next group");
  }
  if (status.contains("flush") && status["flush"].is_object()) {
    const Json& fl = status["flush"];
    f.emplace_back("flush requests", member(fl, "requests"));
    f.emplace_back("device flushes",
                   member(fl, "device_flushes") + " (" + member(fl, "requests_per_flush") +
                       " requests per flush, " + member(fl, "flush_us") + " us each)");
    f.emplace_back("clean batches", member(fl, "clean_batches") + " (nothing to flush)");
    f.emplace_back("failed flushes", member(fl, "failed_flushes"));
  }
  if (status.contains("btt") && status["btt"].is_object()) {
    const Json& b = status["btt"];
    f.emplace_back("BTT epochs", member(b, "epochs") + " (" + member(b, "sectors_per_epoch") +
                                     " sectors per epoch)");
  }
  print_fields(f);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Look at vpmfs images and mounts", "vpmfs-ctl"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "vpmfs-ctl " VPMFS_VERSION);
  app.footer(
      "info and dump read the image without taking it over: they work while it is "
      "mounted.\nExit codes: 0 done, 1 error or damage found, 2 usage error.");

  std::string image, range, mountpoint;
  int arena = -1;
  bool json = false;

  auto* info = app.add_subcommand(
      "info", "image header, BTT arenas and filesystem summary (read-only, works while mounted)");
  info->add_option("IMAGE", image, "image file or device-dax node")->required();
  info->add_flag("--json", json, "one JSON object with the same fields");

  auto* dump = app.add_subcommand("dump", "BTT map entries of some LBAs and every flog lane");
  dump->add_option("IMAGE", image, "image file or device-dax node")->required();
  dump->add_option("--lba", range, "FIRST or FIRST-LAST (at most 1000000 LBAs)")->required();
  auto* arena_option =
      dump->add_option("--arena", arena,
                       "LBAs are premap LBAs of this arena (default: BTT namespace LBAs, which in "
                       "arena 0 are its premap LBAs)")
          ->check(CLI::NonNegativeNumber);
  dump->add_flag("--json", json, "one JSON object");

  auto* status = app.add_subcommand("status", "what the daemon of a mounted vpmfs reports");
  status->add_option("MOUNTPOINT", mountpoint, "where the volume is mounted")->required();
  status->add_flag("--json", json, "the daemon's JSON, pretty-printed");

  // CLI11 would call an unknown command an unexpected argument; name it for what it is.
  if (argc > 1 && argv[1][0] != '-' && std::strcmp(argv[1], "info") != 0 &&
      std::strcmp(argv[1], "dump") != 0 && std::strcmp(argv[1], "status") != 0) {
    std::fprintf(stderr,
                 "vpmfs-ctl: unknown command '%s' (commands: info, dump, status; see "
                 "vpmfs-ctl --help)\n",
                 argv[1]);
    return kExitUsage;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : kExitUsage;
  }
  if (info->parsed()) return cmd_info(image, json);
  if (dump->parsed()) {
    return cmd_dump(image, range, arena_option->count() ? std::optional<int>(arena) : std::nullopt,
                    json);
  }
  return cmd_status(mountpoint, json);
}
