// The result document every C++ bench prints (format in BENCH.md), plus the facts it records:
// machine, date, commit. Also runs a baseline command (a Python script, say) and reads its output.
//
// Usage:
//   kvtier::bench::Report report("bench_alloc", "alloc_free", kvtier::bench::CpuMachine());
//   report.Add({"alloc_free_1t", 2.1e7, "pairs/s", "python_free_list_1t", 1.5e6});
//   std::cout << report.ToJson();
//   report.WriteToDir("bench/results", "cpu");
//   // -> bench/results/bench_alloc-alloc_free-cpu-<date>.json
//
// Header-only so each bench/*.cc stays a single translation unit (CMake builds one binary each).
#pragma once

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace kvtier::bench {

// A JSON string literal (with the quotes) for `s`: escapes quotes, backslashes and control bytes.
inline std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\b':
        out += "\\b";
        break;
      case '\f':
        out += "\\f";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\r':
        out += "\\r";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through unchanged
        }
    }
  }
  return out + "\"";
}

// A JSON number; NaN and infinities (which JSON lacks) become null.
inline std::string JsonNumber(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.10g", v);
  return buf;
}

// Runs `command` through /bin/sh and returns its stdout, or nullopt when it cannot start or exits
// non-zero. stderr is left to the terminal so a failing baseline explains itself.
inline std::optional<std::string> CaptureCommand(const std::string& command) {
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return std::nullopt;
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  int rc = pclose(pipe);
  if (rc != 0) return std::nullopt;
  return out;
}

// `s` quoted for /bin/sh: inside single quotes, each ' becomes '\''.
inline std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

inline std::string Trim(std::string s) {
  const char* ws = " \t\r\n";
  s.erase(0, s.find_first_not_of(ws));
  s.erase(s.find_last_not_of(ws) + 1);
  return s;
}

// "<CPU model>, <n> cores" from /proc/cpuinfo (n = the cores this process may run on).
inline std::string CpuMachine() {
  std::string model = "unknown CPU";
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      size_t colon = line.find(':');
      if (colon != std::string::npos) model = Trim(line.substr(colon + 1));
      break;
    }
  }
  unsigned cores = std::thread::hardware_concurrency();
  return model + ", " + std::to_string(cores) + (cores == 1 ? " core" : " cores");
}

// Today's local date, YYYY-MM-DD.
inline std::string Today() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[16];
  std::strftime(buf, sizeof(buf), "%Y-%m-%d", &tm);
  return buf;
}

// The short hash of HEAD where the bench runs inside the repository, else "unknown".
inline std::string GitCommit() {
  auto out = CaptureCommand("git rev-parse --short HEAD 2>/dev/null");
  if (!out) return "unknown";
  std::string hash = Trim(*out);
  return hash.empty() ? "unknown" : hash;
}

// One measured case and the baseline it is compared with (measured in the same run).
struct Result {
  std::string case_name;
  double value = 0;
  std::string unit;
  // Empty: no baseline; `note` must then say why, and the JSON has "baseline": null.
  std::string baseline;
  double baseline_value = NAN;
  // Throughput-like units: ratio = value / baseline. Latency-like: baseline / value. Either
  // way a ratio above 1 means kvtier is ahead.
  bool higher_is_better = true;
  std::string note;

  double ratio() const {
    if (baseline.empty() || !(baseline_value > 0) || !(value > 0)) return NAN;
    return higher_is_better ? value / baseline_value : baseline_value / value;
  }
};

class Report {
 public:
  Report(std::string bench, std::string workload, std::string machine)
      : bench_(std::move(bench)),
        workload_(std::move(workload)),
        machine_(std::move(machine)),
        date_(Today()),
        commit_(GitCommit()) {}

  void Add(Result r) { results_.push_back(std::move(r)); }
  const std::vector<Result>& results() const { return results_; }
  const std::string& date() const { return date_; }

  std::string ToJson() const {
    std::ostringstream o;
    o << "{\n"
      << "  \"bench\": " << JsonString(bench_) << ",\n"
      << "  \"workload\": " << JsonString(workload_) << ",\n"
      << "  \"machine\": " << JsonString(machine_) << ",\n"
      << "  \"date\": " << JsonString(date_) << ",\n"
      << "  \"commit\": " << JsonString(commit_) << ",\n"
      << "  \"results\": [";
    for (size_t i = 0; i < results_.size(); ++i) {
      const Result& r = results_[i];
      const bool has_baseline = !r.baseline.empty();
      o << (i == 0 ? "\n" : ",\n") << "    {\"case\": " << JsonString(r.case_name)
        << ", \"value\": " << JsonNumber(r.value) << ", \"unit\": " << JsonString(r.unit)
        << ", \"baseline\": " << (has_baseline ? JsonString(r.baseline) : "null")
        << ", \"baseline_value\": " << (has_baseline ? JsonNumber(r.baseline_value) : "null")
        << ", \"ratio\": " << JsonNumber(r.ratio());
      if (!r.note.empty()) o << ", \"note\": " << JsonString(r.note);
      o << "}";
    }
    o << (results_.empty() ? "]\n" : "\n  ]\n") << "}\n";
    return o.str();
  }

  // Writes DIR/<bench>-<workload>-<device>-<date>.json (device: "cpu" or a GPU tag such as "h200")
  // and returns the path, or an empty string (with errno's reason on stderr) on failure. A second
  // run on the same day replaces that day's file; older days' files are the history and stay.
  std::string WriteToDir(const std::string& dir, const std::string& device) const {
    if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      std::fprintf(stderr, "cannot create %s: %s\n", dir.c_str(), std::strerror(errno));
      return "";
    }
    std::string path = dir + "/" + bench_ + "-" + workload_ + "-" + device + "-" + date_ + ".json";
    std::ofstream f(path, std::ios::trunc);
    f << ToJson();
    f.close();
    if (!f) {
      std::fprintf(stderr, "cannot write %s\n", path.c_str());
      return "";
    }
    return path;
  }

 private:
  std::string bench_;
  std::string workload_;
  std::string machine_;
  std::string date_;
  std::string commit_;
  std::vector<Result> results_;
};

}  // namespace kvtier::bench
