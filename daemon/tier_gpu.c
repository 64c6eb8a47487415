/* tier_gpu.c - GPU arena: backend selection, slot state machine, copy
 * tokens, completion (poll / reap / event fd) and stats. The bytes are moved
 * by a backend (tier_gpu_emu.c, tier_gpu_cuda.c) behind struct tier_gpu_ops. */
#include <config.h>  /* autoconf's, from the build tree */

#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "cuda_api.h"
#include "tier_gpu_impl.h"

const char *tier_gpu_backend_name(enum tier_gpu_backend b)
{
	switch (b) {
	case TIER_GPU_NONE: return "none";
	case TIER_GPU_EMULATED: return "emulated";
	case TIER_GPU_UVM: return "uvm";
	case TIER_GPU_VMM: return "vmm";
	}
	return "?";
}

const char *tier_gpu_slot_state_name(enum tier_gpu_slot_state s)
{
	switch (s) {
	case TIER_GPU_SLOT_EMPTY: return "empty";
	case TIER_GPU_SLOT_LOADING: return "loading";
	case TIER_GPU_SLOT_RESIDENT: return "resident";
	case TIER_GPU_SLOT_READING: return "reading";
	}
	return "?";
}

int tier_gpu_backend_parse(const char *s, enum tier_gpu_backend *out, bool *is_auto)
{
	*is_auto = false;
	if (!s || !strcmp(s, "auto")) {
		*is_auto = true;
		*out = TIER_GPU_VMM;
		return 0;
	}
	for (int b = TIER_GPU_NONE; b <= TIER_GPU_VMM; b++)
		if (!strcmp(s, tier_gpu_backend_name((enum tier_gpu_backend)b))) {
			*out = (enum tier_gpu_backend)b;
			return 0;
		}
	return -EINVAL;
}

void tier_gpu_notify(struct tier_gpu *g)
{
	uint64_t one = 1;
	ssize_t n;

	/* Already readable and not drained yet: the reader will rescan
	 * everything, one more write would only cost a syscall. */
	if (atomic_exchange(&g->efd_armed, 1))
		return;
	/* EAGAIN only when the counter is saturated: it is readable then. */
	do
		n = write(g->efd, &one, sizeof(one));
	while (n < 0 && errno == EINTR);
}

/* Consumes the wake-up. The flag is cleared first: a completion after this
 * point writes the fd again, one before it is seen by the caller's rescan. */
static void drain(struct tier_gpu *g)
{
	uint64_t cnt;

	atomic_store(&g->efd_armed, 0);
	while (read(g->efd, &cnt, sizeof(cnt)) < 0 && errno == EINTR)
		;
}

static const struct tier_gpu_ops *ops_for(enum tier_gpu_backend b)
{
	switch (b) {
	case TIER_GPU_EMULATED: return &tier_gpu_emu_ops;
#ifdef HAVE_CUDA
	case TIER_GPU_VMM: return &tier_gpu_vmm_ops;
	case TIER_GPU_UVM: return &tier_gpu_uvm_ops;
#else
	case TIER_GPU_VMM:
	case TIER_GPU_UVM:
#endif
	case TIER_GPU_NONE: break;
	}
	return NULL;
}

int tier_gpu_alloc_slots(struct tier_gpu *g)
{
	g->slots = calloc(g->nslots, sizeof(*g->slots));
	g->inflight = calloc(g->nslots, sizeof(*g->inflight));
	return g->slots && g->inflight ? 0 : -ENOMEM;
}

int tier_gpu_count_slots(struct tier_gpu *g, const struct tier_gpu_config *cfg, uint64_t res_gran,
			 struct moe_error *err)
{
	uint64_t res = 0, n;

	if (cfg->resident_bytes) {
		if (res_gran == 0 || cfg->resident_bytes > UINT64_MAX / 2)
			return moe_error_set(err, -EINVAL, "resident region of %llu bytes",
					     (unsigned long long)cfg->resident_bytes);
		/* Not MOE_ALIGN_UP: a vmm stride need not be a power of two. */
		res = (cfg->resident_bytes + res_gran - 1) / res_gran * res_gran;
		if (cfg->capacity < res || cfg->capacity - res < g->stride)
			return moe_error_set(err, -ENOSPC,
					     "capacity %llu holds the %llu resident bytes (%llu with granularity %llu) "
					     "and no expert slot of %llu bytes besides",
					     (unsigned long long)cfg->capacity,
					     (unsigned long long)cfg->resident_bytes, (unsigned long long)res,
					     (unsigned long long)res_gran, (unsigned long long)g->stride);
	}
	n = (cfg->capacity - res) / g->stride;
	if (n == 0)
		return moe_error_set(err, -EINVAL, "capacity %llu below one slot of %llu bytes",
				     (unsigned long long)cfg->capacity, (unsigned long long)g->stride);
	if (n > UINT32_MAX - 1)
		return moe_error_set(err, -EINVAL, "too many slots");
	g->nslots = (uint32_t)n;
	g->res_len = res;
	return 0;
}

static void free_arena(struct tier_gpu *g)
{
	if (g->efd >= 0)
		close(g->efd);
	free(g->slots);
	free(g->inflight);
	free(g);
}

static int try_backend(const struct tier_gpu_config *cfg, enum tier_gpu_backend b,
		       struct tier_gpu **out, struct moe_error *err)
{
	const struct tier_gpu_ops *ops = ops_for(b);
	struct tier_gpu *g;
	int r;

	if (!ops) {
		if (b == TIER_GPU_NONE)
			return moe_error_set(err, -ENODEV, "GPU tier disabled (backend \"none\")");
		return moe_error_set(err, -ENOTSUP, "%s backend not built (no cuda.h at build time)",
				     tier_gpu_backend_name(b));
	}
	g = calloc(1, sizeof(*g));
	if (!g)
		return moe_error_set(err, -ENOMEM, "out of memory");
	g->ops = ops;
	g->backend = b;
	g->device = cfg->device;
	g->slot_bytes = cfg->slot_bytes;
	g->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (g->efd < 0) {
		r = moe_error_set(err, -errno, "eventfd: %s", strerror(errno));
		free_arena(g);
		return r;
	}
	r = ops->init(g, cfg, err);
	if (r < 0) {
		ops->fini(g);
		free_arena(g);
		return moe_error_prefix(err, r, "%s", ops->name);
	}
	*out = g;
	return 0;
}

int tier_gpu_create(const struct tier_gpu_config *cfg, struct tier_gpu **out,
		    struct moe_error *err)
{
	static const enum tier_gpu_backend order[] = { TIER_GPU_VMM, TIER_GPU_UVM, TIER_GPU_EMULATED };
	enum tier_gpu_backend b;
	struct moe_error why[3];
	bool is_auto;
	int r;

	*out = NULL;
	if (tier_gpu_backend_parse(cfg->backend, &b, &is_auto) < 0)
		return moe_error_set(err, -EINVAL,
				     "unknown GPU backend \"%s\" (auto, vmm, uvm, emulated, none)",
				     cfg->backend);
	if (cfg->slot_bytes == 0 || cfg->capacity < cfg->slot_bytes)
		return moe_error_set(err, -EINVAL,
				     "GPU arena: capacity %llu holds no slot of %llu bytes",
				     (unsigned long long)cfg->capacity,
				     (unsigned long long)cfg->slot_bytes);
	if (cfg->slot_bytes > UINT64_MAX / 2)
		return moe_error_set(err, -EINVAL, "GPU arena: slot size too large");
	if (!is_auto)
		return try_backend(cfg, b, out, err);

	for (size_t i = 0; i < MOE_ARRAY_SIZE(order); i++) {
		why[i].msg[0] = 0;
		r = try_backend(cfg, order[i], out, &why[i]);
		if (r == 0) {
			if (i == 0)
				moe_info("gpu tier: vmm (device %d)", cfg->device);
			else if (i == 1)
				moe_info("gpu tier: uvm, because %s", why[0].msg);
			else
				moe_info("gpu tier: emulated, because %s; %s", why[0].msg, why[1].msg);
			return 0;
		}
		/* A real failure of a usable backend (bad sizes, out of
		 * memory) is not a reason to fall back silently. */
		if (r != -ENODEV && r != -ENOTSUP && r != -EOPNOTSUPP)
			return moe_error_set(err, r, "%s", why[i].msg);
	}
	return moe_error_set(err, r, "%s", why[2].msg);
}

void tier_gpu_destroy(struct tier_gpu *g)
{
	if (!g)
		return;
	g->ops->fini(g);
	free_arena(g);
}

enum tier_gpu_backend tier_gpu_backend_of(const struct tier_gpu *g) { return g->backend; }
uint32_t tier_gpu_nslots(const struct tier_gpu *g) { return g->nslots; }
uint64_t tier_gpu_slot_bytes(const struct tier_gpu *g) { return g->slot_bytes; }
uint64_t tier_gpu_slot_stride(const struct tier_gpu *g) { return g->stride; }
int tier_gpu_event_fd(const struct tier_gpu *g) { return g->efd; }
unsigned tier_gpu_inflight(const struct tier_gpu *g) { return g->ninflight; }

uint64_t tier_gpu_resident_offset(const struct tier_gpu *g) { return (uint64_t)g->nslots * g->stride; }
uint64_t tier_gpu_resident_bytes(const struct tier_gpu *g) { return g->res_len; }
uint64_t tier_gpu_resident_addr(const struct tier_gpu *g)
{
	return g->res_len ? g->base + tier_gpu_resident_offset(g) : 0;
}

int tier_gpu_resident_write(struct tier_gpu *g, uint64_t off, const void *src, size_t bytes,
			    struct moe_error *err)
{
	int r;

	if (!g->res_len)
		return moe_error_set(err, -ENOSPC, "the GPU arena has no resident region");
	if (!src || bytes == 0 || off > g->res_len || bytes > g->res_len - off)
		return moe_error_set(err, -EINVAL, "resident write of %zu bytes at %llu (region holds %llu)",
				     bytes, (unsigned long long)off, (unsigned long long)g->res_len);
	r = g->ops->resident_write(g, off, src, bytes, err);
	if (r < 0) {
		g->st.copy_errors++;
		if (r == -ENOMEM)
			g->st.oom++;
		return r;
	}
	g->st.bytes_in += bytes;
	return 0;
}

enum tier_gpu_slot_state tier_gpu_slot_state(const struct tier_gpu *g, uint32_t slot)
{
	return slot < g->nslots ? g->slots[slot].state : TIER_GPU_SLOT_EMPTY;
}

uint64_t tier_gpu_slot_addr(const struct tier_gpu *g, uint32_t slot)
{
	return slot < g->nslots ? g->base + (uint64_t)slot * g->stride : 0;
}

void tier_gpu_get_stats(const struct tier_gpu *g, struct tier_gpu_stats *out)
{
	*out = g->st;
}

int tier_gpu_register_host(struct tier_gpu *g, void *base, size_t len, struct moe_error *err)
{
	int r;

	if (!base || !len)
		return moe_error_set(err, -EINVAL, "register host arena: empty range");
	if (g->host_base)
		return moe_error_set(err, -EBUSY, "a host arena is already registered");
	r = g->ops->register_host(g, base, len, err);
	if (r < 0)
		return r;
	g->host_base = base;
	g->host_len = len;
	return 0;
}

void tier_gpu_unregister_host(struct tier_gpu *g)
{
	if (!g->host_base)
		return;
	/* On failure the range stays registered: destroy tries again. */
	if (g->ops->unregister_host(g) < 0)
		return;
	g->host_base = NULL;
	g->host_len = 0;
}

static bool in_host_arena(const struct tier_gpu *g, const void *p, size_t len)
{
	uintptr_t b = (uintptr_t)g->host_base, a = (uintptr_t)p;

	return g->host_base && a >= b && len <= g->host_len && a - b <= g->host_len - len;
}

static uint64_t next_token(struct tier_gpu *g, uint32_t slot)
{
	/* token = (sequence << 32) | slot, never 0; the sequence is per arena
	 * and only has to differ from the slot's previous copies. */
	uint64_t seq = (g->slots[slot].token >> 32) + 1;

	if ((uint32_t)seq == 0)
		seq = 1;
	return ((seq & 0xffffffffull) << 32) | slot;
}

static int start(struct tier_gpu *g, uint32_t slot, bool to_host, void *host, size_t bytes,
		 uint64_t *token, struct moe_error *err)
{
	struct tier_gpu_slot *s;
	int r;

	if (slot >= g->nslots)
		return moe_error_set(err, -EINVAL, "GPU slot %u out of range (%u slots)", slot, g->nslots);
	if (!host || bytes == 0 || bytes > g->slot_bytes)
		return moe_error_set(err, -EINVAL, "GPU copy of %zu bytes (slot holds %llu)", bytes,
				     (unsigned long long)g->slot_bytes);
	s = &g->slots[slot];
	if (!to_host && s->state != TIER_GPU_SLOT_EMPTY)
		return moe_error_set(err, -EBUSY, "GPU slot %u is %s, not empty", slot,
				     tier_gpu_slot_state_name(s->state));
	if (to_host && s->state != TIER_GPU_SLOT_RESIDENT)
		return moe_error_set(err, -EBUSY, "GPU slot %u is %s, not resident", slot,
				     tier_gpu_slot_state_name(s->state));
	if (to_host && bytes > s->bytes)
		return moe_error_set(err, -EINVAL, "GPU slot %u holds %llu bytes, %zu asked", slot,
				     (unsigned long long)s->bytes, bytes);
	atomic_store_explicit(&s->emu_done, 0, memory_order_relaxed);
	s->to_host = to_host;
	s->op_bytes = bytes;
	s->submit_ns = moe_now_ns();
	r = to_host ? g->ops->copy_out(g, slot, host, bytes, err)
		    : g->ops->copy_in(g, slot, host, bytes, err);
	if (r < 0) {
		g->st.copy_errors++;
		if (r == -ENOMEM)
			g->st.oom++;
		return r;
	}
	if (!in_host_arena(g, host, bytes))
		g->st.unpinned_copies++;
	s->token = next_token(g, slot);
	s->reported = false;
	s->result = 0;
	s->state = to_host ? TIER_GPU_SLOT_READING : TIER_GPU_SLOT_LOADING;
	if (!to_host)
		s->bytes = bytes;
	g->inflight[g->ninflight++] = slot;
	*token = s->token;
	return 0;
}

int tier_gpu_copy_in(struct tier_gpu *g, uint32_t slot, const void *src, size_t bytes,
		     uint64_t *token, struct moe_error *err)
{
	/* The cast is safe: a copy-in only reads host memory. */
	return start(g, slot, false, (void *)(uintptr_t)src, bytes, token, err);
}

int tier_gpu_copy_out(struct tier_gpu *g, uint32_t slot, void *dst, size_t bytes,
		      uint64_t *token, struct moe_error *err)
{
	return start(g, slot, true, dst, bytes, token, err);
}

static void drop_inflight(struct tier_gpu *g, uint32_t slot)
{
	for (uint32_t i = 0; i < g->ninflight; i++)
		if (g->inflight[i] == slot) {
			g->inflight[i] = g->inflight[--g->ninflight];
			return;
		}
}

/* Queries slot's copy if it is still in flight; on completion moves the
 * state on. Returns 1 done (ok), 0 pending, <0 failed. The slot stays in
 * g->inflight until its completion is reported. */
static int finish(struct tier_gpu *g, uint32_t slot)
{
	struct tier_gpu_slot *s = &g->slots[slot];
	int q;

	if (s->state != TIER_GPU_SLOT_LOADING && s->state != TIER_GPU_SLOT_READING)
		return s->result < 0 ? s->result : 1;
	q = g->ops->query(g, slot);
	if (q == 0)
		return 0;
	g->st.copy_ns += moe_now_ns() - s->submit_ns;
	if (q < 0) {
		g->st.copy_errors++;
		s->result = q;
		/* A failed copy-in leaves nothing valid; a failed copy-out
		 * does not touch the slot's payload. */
		s->state = s->to_host ? TIER_GPU_SLOT_RESIDENT : TIER_GPU_SLOT_EMPTY;
		if (!s->to_host)
			s->bytes = 0;
		return q;
	}
	s->result = 0;
	if (s->to_host) {
		g->st.copies_out++;
		g->st.bytes_out += s->op_bytes;
	} else {
		g->st.copies_in++;
		g->st.bytes_in += s->op_bytes;
	}
	s->state = TIER_GPU_SLOT_RESIDENT;
	return 1;
}

int tier_gpu_poll(struct tier_gpu *g, uint64_t token)
{
	uint32_t slot = (uint32_t)token;
	struct tier_gpu_slot *s;
	int r;

	if (token == 0 || slot >= g->nslots || g->slots[slot].token != token)
		return -ESTALE;
	s = &g->slots[slot];
	r = finish(g, slot);
	if (r == 0)
		return 0;
	if (!s->reported) {
		s->reported = true;
		drop_inflight(g, slot);
	}
	return r;
}

int tier_gpu_reap(struct tier_gpu *g, struct tier_gpu_done *out, unsigned max)
{
	unsigned n = 0;

	/* Drain first: a completion that lands after this re-arms the fd,
	 * so no wake-up is lost. */
	drain(g);
	for (uint32_t i = 0; i < g->ninflight && n < max;) {
		uint32_t slot = g->inflight[i];
		struct tier_gpu_slot *s = &g->slots[slot];
		int r = finish(g, slot);

		if (r == 0) {
			i++;
			continue;
		}
		s->reported = true;
		out[n].token = s->token;
		out[n].slot = slot;
		out[n].to_host = s->to_host;
		out[n].rc = r < 0 ? r : 0;
		n++;
		/* Swap-remove: the last entry moves into i, look at it next. */
		g->inflight[i] = g->inflight[--g->ninflight];
	}
	/* More may be done than fit: keep the fd readable for the next round. */
	if (n == max && g->ninflight)
		tier_gpu_notify(g);
	return (int)n;
}

int tier_gpu_wait(struct tier_gpu *g, uint64_t token, int timeout_ms)
{
	uint64_t deadline = timeout_ms < 0 ? UINT64_MAX : moe_now_ns() + (uint64_t)timeout_ms * 1000000ull;
	struct pollfd pfd = { .fd = g->efd, .events = POLLIN };
	bool drained = false;
	int r;

	for (;;) {
		uint64_t now;
		int ms;

		r = tier_gpu_poll(g, token);
		if (r != 0)
			break;
		now = moe_now_ns();
		if (now >= deadline) {
			r = -ETIMEDOUT;
			break;
		}
		/* Cap the sleep: a backend whose notify raced with the drain
		 * below costs at most 10 ms, never a hang. */
		ms = (int)MOE_MIN((deadline - now) / 1000000ull + 1, 10ull);
		if (poll(&pfd, 1, ms) > 0) {
			drain(g);
			drained = true;
		}
	}
	/* Wake-ups of other copies were consumed here: hand them back to
	 * the event loop, whose reap() finds what is done. */
	if (drained && g->ninflight)
		tier_gpu_notify(g);
	return r;
}

int tier_gpu_evict(struct tier_gpu *g, uint32_t slot, bool release)
{
	struct tier_gpu_slot *s;
	int r;

	if (slot >= g->nslots)
		return -EINVAL;
	s = &g->slots[slot];
	if (s->state == TIER_GPU_SLOT_EMPTY) {
		/* An empty slot may still own a chunk to give back. */
		if (release && s->has_chunk)
			return g->ops->evict(g, slot, true);
		return -ENOENT;
	}
	if (s->state != TIER_GPU_SLOT_RESIDENT)
		return -EBUSY;
	r = g->ops->evict(g, slot, release);
	if (r < 0)
		return r;
	s->state = TIER_GPU_SLOT_EMPTY;
	s->bytes = 0;
	/* The token keeps its sequence (the next copy gets a new one), but
	 * polling the old copy now says its payload is gone. */
	s->result = -ESTALE;
	g->st.evictions++;
	return 0;
}

int tier_gpu_export(struct tier_gpu *g, struct tier_gpu_export *out, struct moe_error *err)
{
	memset(out, 0, sizeof(*out));
	out->backend = g->backend;
	out->nslots = g->nslots;
	out->slot_bytes = g->slot_bytes;
	out->slot_stride = g->stride;
	out->generation = g->generation;
	out->device = g->device;
	return g->ops->export_(g, out, err);
}

void tier_gpu_export_free(struct tier_gpu_export *e)
{
	if (!e)
		return;
	for (uint32_t i = 0; i < e->nfds; i++)
		if (e->fds && e->fds[i] >= 0)
			close(e->fds[i]);
	free(e->fds);
	free(e->offsets);
	e->fds = NULL;
	e->offsets = NULL;
	e->nfds = 0;
}
