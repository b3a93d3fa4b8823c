// snapshot_writer: a helper executable of the snapshot tests (test_snapshot.cpp, python/snapshot_h5py.py).
//
//   snapshot_writer write PATH [--n N] [--dim D] [--steps S] [--alias] [--deflate L] [--labels]
//                              [--raw FILE] [--fsize-limit BYTES]
//       Builds the writer engine (snapshot_inputs.hpp), runs S fed steps, saves it to PATH.
//       --labels stores labels i % 7; --raw also writes the bank rows as raw little-endian float32
//       (N x D) and last_update as int64 to FILE and FILE.last_update (what h5py must read back);
//       --fsize-limit sets RLIMIT_FSIZE (SIGXFSZ ignored) first, so the save fails part way
//       through writing, as on a full disk. Prints "step S hash H".
//   snapshot_writer loop PATH [--n N] [--dim D] [--count C] [--wait-go]
//       Builds the writer engine, prints "ready" on stdout (with --wait-go then waits for a line on
//       stdin), then runs one step and saves to PATH, C times (0: until killed), printing
//       "saved STEP" after each save. The kill-during-write test SIGKILLs it at random moments.
//   snapshot_writer resume IN OUT --steps S --input-seed X --batch B --losses FILE
//       Loads IN in this fresh process, runs S steps fed batch_for_step(X, step), writes the bits of
//       each step's loss, z, z_estimate, mean_p_positive (hex) to FILE, saves the engine to OUT.
//   snapshot_writer import SRC DATASET OUT
//       import_bank(SRC, DATASET); prints "renormalised R n N dim D"; saves the bank as a snapshot
//       (uniform sampler) to OUT.
// A membank::Error prints "error: <message>" on stderr and exits with status 2; usage errors exit 64.
#include "snapshot_inputs.hpp"

#include <membank/error.hpp>
#include <membank/snapshot.hpp>

#include <fmt/format.h>

#include <sys/prctl.h>
#include <sys/resource.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

using namespace mbtest;

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::cerr << "snapshot_writer: " << why << "\n(see the comment at the top of tests/snapshot_writer.cpp)\n";
  std::exit(64);
}

/// Positional arguments and --options (flags map to "1").
struct Args {
  std::vector<std::string> pos;
  std::map<std::string, std::string> opt;
  long long num(const std::string& name, long long def) const {
    const auto it = opt.find(name);
    return it == opt.end() ? def : std::stoll(it->second);
  }
  std::string str(const std::string& name, const std::string& def = "") const {
    const auto it = opt.find(name);
    return it == opt.end() ? def : it->second;
  }
  bool flag(const std::string& name) const { return opt.count(name) > 0; }
};

Args parse(int argc, char** argv) {
  static const char* flags[] = {"--alias", "--labels", "--wait-go"};
  Args a;
  for (int i = 2; i < argc; ++i) {
    const std::string s = argv[i];
    if (s.rfind("--", 0) == 0) {
      bool is_flag = false;
      for (const char* f : flags) is_flag = is_flag || s == f;
      if (is_flag) {
        a.opt[s] = std::string(1, '1');  // (not = "1": a GCC 12 -Wrestrict false positive)
      } else {
        if (i + 1 >= argc) usage(s + " needs a value");
        a.opt[s] = argv[++i];
      }
    } else {
      a.pos.push_back(s);
    }
  }
  return a;
}

membank::Engine writer_engine(const Args& a) {
  const index_t n = a.num("--n", 200000), dim = a.num("--dim", 64);
  return make_engine(n, dim, a.flag("--alias"), writer_config(), kWriterBankSeed);
}

index_t writer_batch(const membank::Engine& e) { return std::min<index_t>(kWriterBatch, e.bank().size()); }

int cmd_write(const Args& a) {
  if (a.pos.size() != 1) usage("write PATH [options]");
  const long long limit = a.num("--fsize-limit", 0);
  membank::Engine e = writer_engine(a);
  run_fed_steps(e, static_cast<int>(a.num("--steps", 3)), kWriterInputSeed, writer_batch(e));
  std::vector<std::int64_t> labels;
  if (a.flag("--labels")) {
    labels.resize(static_cast<std::size_t>(e.bank().size()));
    for (std::size_t i = 0; i < labels.size(); ++i) labels[i] = static_cast<std::int64_t>(i % 7);
  }
  if (const std::string raw = a.str("--raw"); !raw.empty()) {
    std::ofstream out(raw, std::ios::binary);
    for (index_t i = 0; i < e.bank().size(); ++i)
      out.write(reinterpret_cast<const char*>(e.bank().row(i)),
                static_cast<std::streamsize>(sizeof(float) * static_cast<std::size_t>(e.bank().dim())));
    std::ofstream lu(raw + ".last_update", std::ios::binary);
    lu.write(reinterpret_cast<const char*>(e.bank().last_update().data()),
             static_cast<std::streamsize>(sizeof(std::int64_t) * e.bank().last_update().size()));
    if (!out || !lu) usage("cannot write " + raw);
  }
  if (limit > 0) {
    std::signal(SIGXFSZ, SIG_IGN);
    const rlimit rl{static_cast<rlim_t>(limit), static_cast<rlim_t>(limit)};
    if (setrlimit(RLIMIT_FSIZE, &rl) != 0) usage("setrlimit failed");
  }
  membank::SnapshotOptions opt;
  opt.deflate_level = static_cast<int>(a.num("--deflate", 0));
  membank::save_snapshot(a.pos[0], e, opt, labels);
  std::cout << "step " << e.steps_done() << " hash " << state_hash(e) << std::endl;
  return 0;
}

int cmd_loop(const Args& a) {
  if (a.pos.size() != 1) usage("loop PATH [options]");
  // a writer whose test died must not save forever
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  membank::Engine e = writer_engine(a);
  const long long count = a.num("--count", 0);
  std::cout << "ready" << std::endl;  // the engine is built: what follows is steps and saves
  if (a.flag("--wait-go")) {
    std::string line;
    if (!std::getline(std::cin, line)) return 0;  // the test ended without starting us
  }
  for (long long i = 0; count == 0 || i < count; ++i) {
    run_fed_steps(e, 1, kWriterInputSeed, writer_batch(e));
    membank::save_snapshot(a.pos[0], e);
    std::cout << "saved " << e.steps_done() << std::endl;
  }
  return 0;
}

int cmd_resume(const Args& a) {
  if (a.pos.size() != 2 || a.str("--losses").empty())
    usage("resume IN OUT --steps S --input-seed X --batch B --losses FILE");
  membank::Engine e = membank::load_snapshot(a.pos[0]);
  const auto stats = run_fed_steps(e, static_cast<int>(a.num("--steps", 1)),
                                   static_cast<std::uint64_t>(a.num("--input-seed", 0)), a.num("--batch", 8));
  std::ofstream out(a.str("--losses"));
  const auto bits = [](double x) {
    std::uint64_t u = 0;
    std::memcpy(&u, &x, sizeof u);
    return fmt::format("{:016x}", u);
  };
  for (const auto& s : stats)
    out << bits(s.loss) << ' ' << bits(s.z) << ' ' << bits(s.z_estimate) << ' ' << bits(s.mean_p_positive) << '\n';
  if (!out) usage("cannot write the losses file");
  membank::save_snapshot(a.pos[1], e);
  return 0;
}

int cmd_import(const Args& a) {
  if (a.pos.size() != 3) usage("import SRC DATASET OUT");
  index_t renormalised = -1;
  membank::Bank bank = membank::import_bank(a.pos[0], a.pos[1], &renormalised);
  const index_t n = bank.size(), dim = bank.dim();
  std::cout << "renormalised " << renormalised << " n " << n << " dim " << dim << std::endl;
  membank::EngineConfig cfg;
  cfg.k = 1;
  membank::Engine e(std::move(bank), std::make_unique<membank::UniformSampler>(n), cfg);
  membank::save_snapshot(a.pos[2], e);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) usage("expected a command: write, loop, resume, import");
  const std::string cmd = argv[1];
  const Args a = parse(argc, argv);
  try {
    if (cmd == "write") return cmd_write(a);
    if (cmd == "loop") return cmd_loop(a);
    if (cmd == "resume") return cmd_resume(a);
    if (cmd == "import") return cmd_import(a);
  } catch (const membank::Error& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return 2;
  }
  usage("unknown command " + cmd);
}
