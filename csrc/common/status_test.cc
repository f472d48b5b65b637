// Tests for Status / StatusOr: codes, names, ToString, and value-or-error access.
#include "common/status.h"

#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

namespace kvtier {
namespace {

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_TRUE(Status::OK().ok());
}

TEST(StatusTest, EveryFactoryGivesItsCodeAndMessage) {
  struct Case {
    Status status;
    StatusCode code;
    const char* name;
  };
  const std::vector<Case> cases = {
      {Status::InvalidArgument("m"), StatusCode::kInvalidArgument, "InvalidArgument"},
      {Status::NotFound("m"), StatusCode::kNotFound, "NotFound"},
      {Status::AlreadyExists("m"), StatusCode::kAlreadyExists, "AlreadyExists"},
      {Status::ResourceExhausted("m"), StatusCode::kResourceExhausted, "ResourceExhausted"},
      {Status::FailedPrecondition("m"), StatusCode::kFailedPrecondition, "FailedPrecondition"},
      {Status::InProgress("m"), StatusCode::kInProgress, "InProgress"},
      {Status::DeadlineExceeded("m"), StatusCode::kDeadlineExceeded, "DeadlineExceeded"},
      {Status::IoError("m"), StatusCode::kIoError, "IoError"},
      {Status::Corruption("m"), StatusCode::kCorruption, "Corruption"},
      {Status::Unavailable("m"), StatusCode::kUnavailable, "Unavailable"},
      {Status::Internal("m"), StatusCode::kInternal, "Internal"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_FALSE(c.status.ok());
    EXPECT_EQ(c.status.code(), c.code);
    EXPECT_EQ(c.status.message(), "m");
    EXPECT_STREQ(StatusCodeName(c.code), c.name);
    EXPECT_EQ(c.status.ToString(), std::string(c.name) + ": m");
  }
}

// python/kvtier/errors.py maps these integers to exception classes; they must never shift.
TEST(StatusTest, CodeValuesMatchThePythonMapping) {
  EXPECT_EQ(static_cast<int>(StatusCode::kOk), 0);
  EXPECT_EQ(static_cast<int>(StatusCode::kInvalidArgument), 1);
  EXPECT_EQ(static_cast<int>(StatusCode::kNotFound), 2);
  EXPECT_EQ(static_cast<int>(StatusCode::kAlreadyExists), 3);
  EXPECT_EQ(static_cast<int>(StatusCode::kResourceExhausted), 4);
  EXPECT_EQ(static_cast<int>(StatusCode::kFailedPrecondition), 5);
  EXPECT_EQ(static_cast<int>(StatusCode::kInProgress), 6);
  EXPECT_EQ(static_cast<int>(StatusCode::kDeadlineExceeded), 7);
  EXPECT_EQ(static_cast<int>(StatusCode::kIoError), 8);
  EXPECT_EQ(static_cast<int>(StatusCode::kCorruption), 9);
  EXPECT_EQ(static_cast<int>(StatusCode::kUnavailable), 10);
  EXPECT_EQ(static_cast<int>(StatusCode::kInternal), 11);
  EXPECT_EQ(static_cast<int>(StatusCode::kGeometryMismatch), 12);
}

TEST(StatusTest, UnknownCodeHasAName) {
  EXPECT_STREQ(StatusCodeName(static_cast<StatusCode>(99)), "Unknown");
}

TEST(StatusTest, ToStringKeepsTheMessageVerbatim) {
  Status s = Status::InvalidArgument("block id 70 is out of range [0, 64)");
  EXPECT_EQ(s.ToString(), "InvalidArgument: block id 70 is out of range [0, 64)");
  EXPECT_EQ(Status(StatusCode::kIoError, "").ToString(), "IoError: ");
}

TEST(StatusTest, CopiesAreIndependent) {
  Status a = Status::NotFound("x");
  Status b = a;
  a = Status::OK();
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(b.code(), StatusCode::kNotFound);
  EXPECT_EQ(b.message(), "x");
}

Status FailsWith(StatusCode code) { return Status(code, "inner"); }

Status Chain(StatusCode inner, bool* reached_end) {
  KVTIER_RETURN_IF_ERROR(FailsWith(inner));
  *reached_end = true;
  return Status::Internal("end");
}

TEST(StatusTest, ReturnIfErrorPropagatesOnlyErrors) {
  bool reached = false;
  Status s = Chain(StatusCode::kCorruption, &reached);
  EXPECT_FALSE(reached);
  EXPECT_EQ(s.code(), StatusCode::kCorruption);
  EXPECT_EQ(s.message(), "inner");

  s = Chain(StatusCode::kOk, &reached);
  EXPECT_TRUE(reached);
  EXPECT_EQ(s.code(), StatusCode::kInternal);
}

TEST(StatusOrTest, HoldsAValue) {
  StatusOr<int> v = 42;
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v.status().ok());
  EXPECT_EQ(v.value(), 42);
  EXPECT_EQ(*v, 42);
  *v = 7;
  EXPECT_EQ(v.value(), 7);
  const StatusOr<int>& cv = v;
  EXPECT_EQ(cv.value(), 7);
}

TEST(StatusOrTest, HoldsAnError) {
  StatusOr<std::string> v = Status::ResourceExhausted("no blocks");
  EXPECT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), StatusCode::kResourceExhausted);
  EXPECT_EQ(v.status().message(), "no blocks");
}

TEST(StatusOrTest, ArrowReachesTheValue) {
  StatusOr<std::string> v = std::string("abc");
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(v->size(), 3u);
}

TEST(StatusOrTest, MoveOnlyValueCanBeMovedOut) {
  StatusOr<std::unique_ptr<int>> v = std::make_unique<int>(5);
  ASSERT_TRUE(v.ok());
  std::unique_ptr<int> p = std::move(v).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 5);
}

StatusOr<int> Half(int x) {
  if (x % 2 != 0) return Status::InvalidArgument("odd");
  return x / 2;
}

TEST(StatusOrTest, FunctionsReturnEitherSide) {
  auto a = Half(8);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, 4);
  auto b = Half(3);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().ToString(), "InvalidArgument: odd");
}

}  // namespace
}  // namespace kvtier
