// The doctest runner of fashion_mnist_tests (the cases live in test_encoders.cpp).
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>
