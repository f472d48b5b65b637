// Clang thread-safety annotations (checked with -Wthread-safety under clang; no-ops elsewhere).
#pragma once

#if defined(__clang__)
#define KVTIER_THREAD_ANNOTATION(x) __attribute__((x))
#else
#define KVTIER_THREAD_ANNOTATION(x)
#endif

#define GUARDED_BY(x) KVTIER_THREAD_ANNOTATION(guarded_by(x))
#define REQUIRES_LOCK(...) KVTIER_THREAD_ANNOTATION(requires_capability(__VA_ARGS__))
#define EXCLUDES(...) KVTIER_THREAD_ANNOTATION(locks_excluded(__VA_ARGS__))
