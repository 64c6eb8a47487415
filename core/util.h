/* util.h - small helpers shared by every subsystem: errors, logging, checked
 * arithmetic, time. Functions return 0 or a negative errno; a struct moe_error
 * carries the human-readable reason to the caller that prints it. */
#ifndef MOETIER_UTIL_H
#define MOETIER_UTIL_H

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>

#define MOE_ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define MOE_ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((__typeof__(x))(a) - 1))
#define MOE_MIN(a, b) ((a) < (b) ? (a) : (b))
#define MOE_MAX(a, b) ((a) > (b) ? (a) : (b))
#define MOE_UNUSED __attribute__((unused))
#define MOE_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)

/* Why something failed, for the operator. Always NUL-terminated. */
struct moe_error {
	char msg[512];
};

/* Formats msg into err (when err is non-NULL) and returns rc (a negative
 * errno), so callers can write: return moe_error_set(err, -EINVAL, "..."). */
int moe_error_set(struct moe_error *err, int rc, const char *fmt, ...) MOE_PRINTF(3, 4);
/* Prefixes an existing message: "ctx: old message". Returns rc. */
int moe_error_prefix(struct moe_error *err, int rc, const char *fmt, ...) MOE_PRINTF(3, 4);

enum moe_log_level { MOE_LOG_ERR = 0, MOE_LOG_WARN, MOE_LOG_INFO, MOE_LOG_DEBUG };

/* Logging goes to stderr (journald adds time and priority when run under
 * systemd, so lines carry a "<N>" prefix there instead of a timestamp). */
void moe_log_init(const char *ident, enum moe_log_level level, bool journal_prefix);
void moe_log_set_level(enum moe_log_level level);
enum moe_log_level moe_log_get_level(void);
void moe_log(enum moe_log_level level, const char *fmt, ...) MOE_PRINTF(2, 3);
#define moe_err(...) moe_log(MOE_LOG_ERR, __VA_ARGS__)
#define moe_warn(...) moe_log(MOE_LOG_WARN, __VA_ARGS__)
#define moe_info(...) moe_log(MOE_LOG_INFO, __VA_ARGS__)
#define moe_debug(...) do { if (moe_log_get_level() >= MOE_LOG_DEBUG) moe_log(MOE_LOG_DEBUG, __VA_ARGS__); } while (0)

/* Overflow-checked size arithmetic: return false on overflow. */
static inline bool moe_mul_u64(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_mul_overflow(a, b, out); }
static inline bool moe_add_u64(uint64_t a, uint64_t b, uint64_t *out) { return !__builtin_add_overflow(a, b, out); }

static inline uint64_t moe_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Full read/write at an offset, retrying on EINTR and short transfers.
 * Return 0, -EIO on an unexpected end of file, or -errno. */
int moe_pread_full(int fd, void *buf, size_t len, uint64_t off);
int moe_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int moe_write_full(int fd, const void *buf, size_t len);

/* Parses a size such as "64M", "2G", "4096", "1.5G" (binary units). */
int moe_parse_size(const char *s, uint64_t *out);
/* Formats bytes as "16.5 MiB" into buf. Returns buf. */
const char *moe_fmt_size(uint64_t bytes, char *buf, size_t len);

#endif
