/* fault.c - countdown fault injector (see fault.h). */
#include "fault.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static const char *const point_names[FAULT__COUNT] = {
#define X(id, name, help) [FAULT_##id] = name,
	MOE_FAULT_POINTS(X)
#undef X
};

struct point_state {
	long after;   /* hits still to pass before failing */
	long repeat;  /* failures left; < 0 = forever; 0 = disarmed */
	uint64_t hits, fired;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct point_state points[FAULT__COUNT];
/* Fast path: no point armed means no lock. */
static _Atomic int n_armed;

bool fault_enabled(void)
{
#ifdef MOETIER_FAULT_INJECTION
	return true;
#else
	return false;
#endif
}

int fault_lookup(const char *name)
{
	for (int i = 0; i < FAULT__COUNT; i++)
		if (name && strcmp(name, point_names[i]) == 0)
			return i;
	return -ENOENT;
}

const char *fault_name(enum fault_point p)
{
	return (unsigned)p < FAULT__COUNT ? point_names[p] : "?";
}

static void recount_locked(void)
{
	int n = 0;
	for (int i = 0; i < FAULT__COUNT; i++)
		n += points[i].repeat != 0;
	n_armed = n;
}

int fault_arm(enum fault_point p, long after, long repeat)
{
	if ((unsigned)p >= FAULT__COUNT || after < 0)
		return -EINVAL;
	if (!fault_enabled())
		return -ENOTSUP;
	pthread_mutex_lock(&lock);
	points[p].after = after;
	points[p].repeat = repeat < 0 ? -1 : repeat;
	recount_locked();
	pthread_mutex_unlock(&lock);
	return 0;
}

int fault_arm_name(const char *name, long after, long repeat)
{
	int p = fault_lookup(name);
	return p < 0 ? p : fault_arm((enum fault_point)p, after, repeat);
}

void fault_disarm_all(void)
{
	pthread_mutex_lock(&lock);
	for (int i = 0; i < FAULT__COUNT; i++)
		points[i].repeat = 0;
	n_armed = 0;
	pthread_mutex_unlock(&lock);
}

static int parse_long(const char *s, long *out)
{
	char *end;
	errno = 0;
	long v = strtol(s, &end, 10);
	if (errno || end == s || *end)
		return -EINVAL;
	*out = v;
	return 0;
}

int fault_arm_spec(const char *spec, struct moe_error *err)
{
	if (!spec)
		return 0;
	char *copy = strdup(spec);
	if (!copy)
		return moe_error_set(err, -ENOMEM, "fault spec: out of memory");
	int rc = 0;
	char *save = NULL;
	for (char *item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
		char *f[3] = { item, NULL, NULL };
		char *c1 = strchr(item, ':');
		if (c1) {
			*c1 = 0;
			f[1] = c1 + 1;
			char *c2 = strchr(f[1], ':');
			if (c2) {
				*c2 = 0;
				f[2] = c2 + 1;
			}
		}
		long after = 0, repeat = 1;
		int p = fault_lookup(f[0]);
		if (p < 0) {
			rc = moe_error_set(err, -EINVAL, "fault spec: unknown fault point \"%s\"", f[0]);
			break;
		}
		if ((f[1] && parse_long(f[1], &after)) || (f[2] && parse_long(f[2], &repeat)) || after < 0) {
			rc = moe_error_set(err, -EINVAL,
					   "fault spec: \"%s\" wants name:after:repeat (after >= 0, repeat -1 = forever)",
					   f[0]);
			break;
		}
		rc = fault_arm((enum fault_point)p, after, repeat);
		if (rc < 0) {
			moe_error_set(err, rc, "fault spec: %s: fault injection is not compiled into this build",
				      f[0]);
			break;
		}
	}
	free(copy);
	return rc;
}

static pthread_once_t env_once = PTHREAD_ONCE_INIT;
static int env_rc;
static struct moe_error env_err;

static void env_init(void)
{
	const char *s = getenv("MOETIER_FAULTS");
	if (s && *s) {
		env_rc = fault_arm_spec(s, &env_err);
		if (env_rc == 0)
			moe_warn("fault injection armed from MOETIER_FAULTS=%s", s);
	}
}

int fault_init_env(struct moe_error *err)
{
	pthread_once(&env_once, env_init);
	if (env_rc < 0 && err)
		*err = env_err;
	return env_rc;
}

/* One counter of a point, read under the lock (0 for an unknown point). */
static uint64_t read_count(enum fault_point p, bool fired)
{
	if ((unsigned)p >= FAULT__COUNT)
		return 0;
	pthread_mutex_lock(&lock);
	uint64_t v = fired ? points[p].fired : points[p].hits;
	pthread_mutex_unlock(&lock);
	return v;
}

uint64_t fault_fired(enum fault_point p)
{
	return read_count(p, true);
}

uint64_t fault_hits(enum fault_point p)
{
	return read_count(p, false);
}

bool fault_hit(enum fault_point p)
{
	if ((unsigned)p >= FAULT__COUNT || !fault_enabled())
		return false;
	if (!n_armed) {
		/* Hits are only counted while something is armed: the counter is
		 * for tests that arm a point, and the fast path stays lock-free. */
		return false;
	}
	bool fail = false;
	pthread_mutex_lock(&lock);
	struct point_state *s = &points[p];
	s->hits++;
	if (s->repeat != 0) {
		if (s->after > 0) {
			s->after--;
		} else {
			fail = true;
			s->fired++;
			if (s->repeat > 0 && --s->repeat == 0)
				recount_locked();
		}
	}
	pthread_mutex_unlock(&lock);
	return fail;
}
