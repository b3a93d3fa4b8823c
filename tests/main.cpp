// The doctest runner of membank_tests and of the examples' fashion_mnist_tests (their cases live in their test_*.cpp).
// CTest runs every test case as its own process, selected by name (--test-case=NAME): a run whose
// filters select no test case fails here, so that a misspelt or mangled name cannot pass unseen.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <iostream>

namespace {

int g_cases_started = 0;

/// Counts the test cases that ran (query runs such as --list-test-cases start none).
struct CaseCounter : doctest::IReporter {
  explicit CaseCounter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override { ++g_cases_started; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};
REGISTER_LISTENER("case_counter", 1, CaseCounter);

}  // namespace

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int rc = context.run();
  if (context.shouldExit()) return rc;  // --list-test-cases, --help, ...
  if (g_cases_started == 0) {
    std::cerr << (argc > 0 ? argv[0] : "tests") << ": the filters selected no test case\n";
    return 1;
  }
  return rc;
}
