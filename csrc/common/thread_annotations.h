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
#define CAPABILITY(x) KVTIER_THREAD_ANNOTATION(capability(x))
#define SCOPED_CAPABILITY KVTIER_THREAD_ANNOTATION(scoped_lockable)
#define ACQUIRE(...) KVTIER_THREAD_ANNOTATION(acquire_capability(__VA_ARGS__))
#define RELEASE(...) KVTIER_THREAD_ANNOTATION(release_capability(__VA_ARGS__))
#define TRY_ACQUIRE(...) KVTIER_THREAD_ANNOTATION(try_acquire_capability(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS KVTIER_THREAD_ANNOTATION(no_thread_safety_analysis)
