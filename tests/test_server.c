/* test_server.c - moetierd integration tests: each test starts its own
 * daemon (the built binary) on a tiny generated model in a temporary
 * directory and talks to it through libmoetier and raw socket messages. */
#include "config.h"

#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "moetier/moetier.h"
#include "ffn.h"
#include "pack.h"
#include "route.h"
/* testutil.h's tu__rm builds "%s/%s" paths into 4 KiB: GCC's truncation
 * analysis flags it under -Werror; the paths here are short. */
#pragma GCC diagnostic ignored "-Wformat-truncation"
#include "daemon_probe.h"
#include "testutil.h"

struct env {
	char *dir;
	char pack[512];
	char sock[512];
	char log[512];
	pid_t pid;
};

static void make_model_of(struct env *e, const char *gen_args);

static void make_model(struct env *e)
{
	make_model_of(e, "--family qwen2_moe --preset tiny --experts 16");
}

static void make_model_of(struct env *e, const char *gen_args)
{
	e->dir = tu_mkdtemp("server");
	cr_assert_eq(chmod(e->dir, 0755), 0);
	snprintf(e->pack, sizeof(e->pack), "%s/tiny.moepack", e->dir);
	snprintf(e->sock, sizeof(e->sock), "%s/run/moetierd.sock", e->dir);
	snprintf(e->log, sizeof(e->log), "%s/moetierd.log", e->dir);
	char run[600];
	snprintf(run, sizeof(run), "%s/run", e->dir);
	cr_assert_eq(mkdir(run, 0755), 0);
	/* Generator and packer binaries are separate tools; launched by path. */
	char gen[4096], packer[4096];
	snprintf(gen, sizeof(gen), "%s", tu_build_path("tools/moe-gen"));
	snprintf(packer, sizeof(packer), "%s", tu_build_path("tools/moe-pack"));
	cr_assert_eq(tu_sh("%s model %s --out %s/src >/dev/null", gen, gen_args, e->dir), 0);
	cr_assert_eq(tu_sh("%s convert %s/src -o %s -q >/dev/null", packer, e->dir, e->pack), 0);
}

/* Starts the daemon; extra args (NULL-terminated). Waits until it answers. */
static void start_daemon(struct env *e, const char *host_bytes, const char *extra)
{
	pid_t p = fork();
	cr_assert(p >= 0);
	if (p == 0) {
		char hb[64], so[600];
		snprintf(hb, sizeof(hb), "--host-bytes=%s", host_bytes);
		snprintf(so, sizeof(so), "--socket=%s", e->sock);
		int fd = open(e->log, O_WRONLY | O_CREAT | O_APPEND, 0644);
		if (fd >= 0) {
			dup2(fd, 2);
			close(fd);
		}
		/* extra: one or more options, separated by spaces */
		char xb[1024], *argv[32], *save = NULL;
		unsigned n = 0;
		argv[n++] = "moetierd";
		argv[n++] = "--foreground";
		argv[n++] = "--config=";
		argv[n++] = so;
		argv[n++] = hb;
		argv[n++] = "--socket-group=";
		argv[n++] = "--log-level=debug";
		snprintf(xb, sizeof(xb), "%s", extra ? extra : "--seccomp");
		for (char *t = strtok_r(xb, " ", &save); t && n < 30; t = strtok_r(NULL, " ", &save))
			argv[n++] = t;
		argv[n++] = e->pack;
		argv[n] = NULL;
		execv(tu_build_path("moetierd"), argv);
		_exit(127);
	}
	e->pid = p;
	probe_wait_up(p, e->sock, e->log);
}

static int stop_daemon(struct env *e)
{
	int st = probe_stop(e->pid);
	e->pid = 0;
	return st;
}

static void teardown(struct env *e)
{
	stop_daemon(e);
	tu_rmtree(e->dir);
	e->dir = NULL;
}

static moet_ctx *attach(struct env *e, const char *name)
{
	moet_ctx *c = NULL;
	struct moet_connect_opts o = { sizeof(o), e->sock, NULL, name, MOET_CAP_RING | MOET_CAP_HOST_ARENA, 0, 20 };
	int rc = moet_connect(&o, &c);
	cr_assert_eq(rc, 0, "connect: %s (%s)", moet_strerror(rc), moet_last_error(NULL));
	return c;
}

/* ---- 8 concurrent clients, byte-checked against the pack ------------------- */

/* What each stress client saw, in memory shared with the parent. */
struct loop_count {
	uint64_t asked, served, missed, failed, checked;
	int32_t rc_mismatch;
};

static int client_loop(struct env *e, unsigned seed, unsigned iters, struct loop_count *cnt)
{
	struct pack_file *pf;
	struct moe_error err;
	if (pack_open(e->pack, PACK_OPEN_NO_DIRECT, &pf, &err))
		return 10;
	uint64_t xb = pack_extent_bytes(pf);
	uint8_t *ref = aligned_alloc(4096, xb);
	moet_ctx *c;
	struct moet_connect_opts o = { sizeof(o), e->sock, NULL, "stress", 0, 0, 20 };
	if (moet_connect(&o, &c))
		return 11;
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	int bad = 0;
	for (unsigned it = 0; it < iters && !bad; it++) {
		uint32_t layer = rand_r(&seed) % mi.n_moe_layers, ids[4];
		unsigned n = 1 + rand_r(&seed) % 4;
		for (unsigned i = 0; i < n; i++)
			ids[i] = rand_r(&seed) % mi.n_experts;
		int32_t slots[4];
		uint8_t tiers[4];
		moet_lease lease;
		int rc = moet_acquire(c, layer, ids, n, 0, slots, tiers, &lease);
		if (rc < 0) {
			bad = 12;
			break;
		}
		int served = 0;
		cnt->asked += n;
		for (unsigned i = 0; i < n; i++) {
			if (slots[i] < 0) {
				/* A blocking acquire came back without it: counted, and
				 * the parent decides how many are acceptable. */
				if (slots[i] == -1)
					cnt->missed++;
				else
					cnt->failed++;
				continue;
			}
			served++;
			cnt->served++;
			const uint8_t *p = moet_slot_ptr(c, tiers[i], slots[i]);
			if (!p || pack_read_expert(pf, layer, ids[i], ref, &err) ||
			    memcmp(p, ref, pf->hdr->extent_payload) != 0)
				bad = 13;
			else
				cnt->checked++;
		}
		if (served != rc)
			cnt->rc_mismatch++;
		if (moet_release(c, lease))
			bad = 14;
	}
	moet_close(c);
	pack_close(pf);
	free(ref);
	return bad;
}

Test(server, eight_clients_read_correct_bytes, .timeout = 120)
{
	struct env e = { 0 };
	make_model(&e);
	/* 20 slots for 48 experts: constant eviction under 8 clients. */
	start_daemon(&e, "240K", NULL);
	struct loop_count *cnt = mmap(NULL, 8 * sizeof(*cnt), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	cr_assert(cnt != MAP_FAILED);
	memset(cnt, 0, 8 * sizeof(*cnt));
	pid_t kids[8];
	for (unsigned i = 0; i < 8; i++) {
		kids[i] = fork();
		if (kids[i] == 0)
			_exit(client_loop(&e, 1000 + i, 150, &cnt[i]));
	}
	struct loop_count tot = { 0 };
	for (unsigned i = 0; i < 8; i++) {
		int st;
		waitpid(kids[i], &st, 0);
		cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client %u failed: status %d", i, WEXITSTATUS(st));
		tot.asked += cnt[i].asked;
		tot.served += cnt[i].served;
		tot.missed += cnt[i].missed;
		tot.failed += cnt[i].failed;
		tot.checked += cnt[i].checked;
		tot.rc_mismatch += cnt[i].rc_mismatch;
	}
	munmap(cnt, 8 * sizeof(*cnt));
	cr_log_info("8 clients: %llu asked, %llu served (%llu byte-checked), %llu missed, %llu failed",
		    (unsigned long long)tot.asked, (unsigned long long)tot.served, (unsigned long long)tot.checked,
		    (unsigned long long)tot.missed, (unsigned long long)tot.failed);
	/* A blocking acquire waits for loads and slots (each client holds at
	 * most 4 of the 20 between acquire and release, within its share), so
	 * every expert is served and checked; a miss or an error here is the
	 * daemon giving up on a client. */
	cr_expect_eq(tot.asked, tot.served + tot.missed + tot.failed);
	cr_expect_gt(tot.asked, 8 * 150, "the clients asked for nothing");
	cr_expect_eq(tot.missed, 0, "%llu of %llu experts came back unserved", (unsigned long long)tot.missed,
		     (unsigned long long)tot.asked);
	cr_expect_eq(tot.failed, 0, "%llu experts failed", (unsigned long long)tot.failed);
	cr_expect_eq(tot.checked, tot.served, "a served expert's bytes differ from the pack");
	cr_expect_eq(tot.rc_mismatch, 0, "acquire's return differs from the slots it filled");
	int dst;
	if (waitpid(e.pid, &dst, WNOHANG) == e.pid) {
		/* Its log says why (a sanitizer report, a seccomp kill...). */
		tu_sh("tail -n 60 %s >&2", e.log);
		e.pid = 0;
		cr_assert_fail("moetierd died under 8 clients: %s %d", WIFSIGNALED(dst) ? "signal" : "exit status",
			       WIFSIGNALED(dst) ? WTERMSIG(dst) : WEXITSTATUS(dst));
	}
	moet_ctx *c = attach(&e, "stats");
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_TEXT, &txt), 0);
	cr_expect(strstr(txt, "server_clients_accepted") != NULL);
	free(txt);
	moet_close(c);
	cr_expect_eq(stop_daemon(&e), 0, "moetierd did not exit cleanly");
	teardown(&e);
}

/* ---- a client killed while holding leases ---------------------------------- */

Test(server, killed_client_leases_reclaimed, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "240K", NULL);
	int pfd[2];
	cr_assert_eq(pipe(pfd), 0);
	pid_t kid = fork();
	if (kid == 0) {
		moet_ctx *c;
		struct moet_connect_opts o = { sizeof(o), e.sock, NULL, "victim", 0, 0, 20 };
		if (moet_connect(&o, &c))
			_exit(1);
		uint32_t ids[2] = { 3, 4 };
		int32_t slots[2];
		moet_lease l;
		int rc = moet_acquire(c, 1, ids, 2, 0, slots, NULL, &l);
		char ok = rc == 2 ? 'y' : 'n';
		if (write(pfd[1], &ok, 1) != 1)
			_exit(2);
		pause();
		_exit(0);
	}
	close(pfd[1]);
	char ok = 0;
	cr_assert_eq(read(pfd[0], &ok, 1), 1);
	cr_assert_eq(ok, 'y');
	moet_ctx *adm = attach(&e, "admin");
	/* Held by the victim: not evictable. */
	cr_expect_eq(moet_evict(adm, 1, 3, MOET_TIER_HOST), -EBUSY);
	kill(kid, SIGKILL);
	waitpid(kid, NULL, 0);
	int rc = -EBUSY;
	for (int i = 0; i < 100 && rc == -EBUSY; i++) {
		probe_sleep_ms(20);
		rc = moet_evict(adm, 1, 3, MOET_TIER_HOST);
	}
	cr_expect_eq(rc, 0, "expert still busy after its client died: %s", moet_strerror(rc));
	cr_expect_eq(moet_evict(adm, 1, 4, MOET_TIER_HOST), 0);
	char *txt = NULL;
	cr_assert_eq(moet_stats(adm, MOET_STATS_JSON, &txt), 0);
	cr_expect(strstr(txt, "\"leases_reclaimed\": 2") != NULL, "%s", txt);
	free(txt);
	moet_close(adm);
	close(pfd[0]);
	teardown(&e);
}

/* ---- malformed control messages and ring entries --------------------------- */

static int raw_connect(struct env *e)
{
	int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	cr_assert(strlen(e->sock) < sizeof(sa.sun_path));
	memcpy(sa.sun_path, e->sock, strlen(e->sock) + 1);
	cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	return fd;
}

/* Sends bytes, returns the status of the reply (or 1 for no reply / EOF). */
static int raw_exchange(int fd, const void *buf, size_t len)
{
	uint8_t rep[4096];
	if (send(fd, buf, len, MSG_NOSIGNAL) < 0)
		return 1;
	struct timeval tv = { 5, 0 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	ssize_t n = recv(fd, rep, sizeof(rep), 0);
	if (n < (ssize_t)sizeof(struct moet_msg))
		return 1;
	struct moet_msg h;
	memcpy(&h, rep, sizeof(h));
	return h.type == MOET_MSG_ERROR ? h.status : 0;
}

static void check_alive(moet_ctx *good)
{
	uint32_t id = 1;
	int32_t slot;
	moet_lease l;
	cr_assert_eq(moet_acquire(good, 0, &id, 1, 0, &slot, NULL, &l), 1);
	cr_assert_eq(moet_release(good, l), 0);
}

Test(server, malformed_messages_and_entries, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", NULL);
	moet_ctx *good = attach(&e, "bystander");
	check_alive(good);

	struct moet_hello hello = { 1, 1, 0, 0, "raw", "" };
	struct {
		const char *what;
		struct moet_msg h;
		size_t len; /* bytes actually sent */
		int expect;
	} table[] = {
		{ "truncated header", { MOET_MSG_MAGIC, 1, MOET_MSG_HELLO, 1, 0, 0, 0 }, 10, -EPROTO },
		{ "bad magic", { 0xdeadbeef, 1, MOET_MSG_HELLO, 1, 0, 0, sizeof(hello) }, 0, -EPROTO },
		{ "wrong version", { MOET_MSG_MAGIC, 99, MOET_MSG_HELLO, 1, 0, 0, sizeof(hello) }, 0, -EPROTONOSUPPORT },
		{ "length mismatch", { MOET_MSG_MAGIC, 1, MOET_MSG_HELLO, 1, 0, 0, 9999 }, 0, -EPROTO },
		{ "not HELLO first", { MOET_MSG_MAGIC, 1, MOET_MSG_STATS, 1, 0, 0, sizeof(hello) }, 0, -EPROTO },
		{ "short HELLO", { MOET_MSG_MAGIC, 1, MOET_MSG_HELLO, 1, 0, 0, 8 }, sizeof(struct moet_msg) + 8, -EPROTO },
	};
	for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
		uint8_t buf[sizeof(struct moet_msg) + sizeof(hello)];
		memcpy(buf, &table[i].h, sizeof(table[i].h));
		memcpy(buf + sizeof(table[i].h), &hello, sizeof(hello));
		int fd = raw_connect(&e);
		int st = raw_exchange(fd, buf, table[i].len ? table[i].len : sizeof(buf));
		cr_expect_eq(st, table[i].expect, "%s: got %d", table[i].what, st);
		close(fd);
		check_alive(good);
	}
	/* A HELLO asking for an impossible version range. */
	{
		struct moet_hello h2 = { 7, 9, 0, 0, "future", "" };
		uint8_t buf[sizeof(struct moet_msg) + sizeof(h2)];
		struct moet_msg h = { MOET_MSG_MAGIC, 1, MOET_MSG_HELLO, 1, 0, 0, sizeof(h2) };
		memcpy(buf, &h, sizeof(h));
		memcpy(buf + sizeof(h), &h2, sizeof(h2));
		int fd = raw_connect(&e);
		cr_expect_eq(raw_exchange(fd, buf, sizeof(buf)), -EPROTONOSUPPORT);
		close(fd);
	}
	/* An attached client sending an unknown type and an oversized message. */
	{
		moet_ctx *c = attach(&e, "raw-after-hello");
		int fd = moet_socket_fd(c);
		struct moet_msg h = { MOET_MSG_MAGIC, 1, 200, 5, 0, 0, 0 };
		cr_expect_eq(raw_exchange(fd, &h, sizeof(h)), -EOPNOTSUPP);
		static uint8_t big[MOET_MAX_MSG + 100];
		struct moet_msg hb = { MOET_MSG_MAGIC, 1, MOET_MSG_SUBMIT, 6, 0, 0, sizeof(big) - sizeof(hb) };
		memcpy(big, &hb, sizeof(hb));
		cr_expect_eq(raw_exchange(fd, big, sizeof(big)), -EMSGSIZE);
		struct moet_msg hs = { MOET_MSG_MAGIC, 1, MOET_MSG_SUBMIT, 7, 0, 0, 0 };
		cr_expect_eq(raw_exchange(fd, &hs, sizeof(hs)), -EPROTO);
		check_alive(good);
		/* Bad ring entries: each fails alone. */
		struct {
			const char *what;
			struct moet_sqe q;
			int expect;
		} ents[] = {
			{ "bad opcode", { .opcode = 77, .count = 1 }, -EOPNOTSUPP },
			{ "layer out of range", { .opcode = MOET_OP_ACQUIRE, .count = 1, .layer = 1000 }, -ERANGE },
			{ "expert out of range", { .opcode = MOET_OP_ACQUIRE, .count = 1, .ids = { 5000 } }, -ERANGE },
			{ "zero count", { .opcode = MOET_OP_ACQUIRE, .count = 0 }, -EINVAL },
			{ "huge count", { .opcode = MOET_OP_ACQUIRE, .count = 60000 }, -E2BIG },
			{ "bad flags", { .opcode = MOET_OP_ACQUIRE, .flags = 0x80, .count = 1 }, -EINVAL },
			{ "bogus lease", { .opcode = MOET_OP_RELEASE, .lease = 0x1234500000007ull }, -ESTALE },
			{ "route: offset past scratch", { .opcode = MOET_OP_ROUTE, .data_off = 0x7ffffff0, .data_len = 64 }, -EFAULT },
			{ "route: wrong length", { .opcode = MOET_OP_ROUTE, .data_off = 0, .data_len = 3 }, -EFAULT },
			{ "prefetch: bad tier", { .opcode = MOET_OP_PREFETCH, .count = 1, .tier = 9 }, -EINVAL },
		};
		for (size_t i = 0; i < sizeof(ents) / sizeof(ents[0]); i++) {
			ents[i].q.user_tag = 100 + i;
			cr_assert_eq(moet_submit(c, &ents[i].q), 0);
			struct moet_cqe out;
			cr_assert_eq(moet_reap(c, &out, 10000), 1, "%s: no completion", ents[i].what);
			cr_expect_eq(out.user_tag, 100 + i);
			cr_expect_eq(out.result, ents[i].expect, "%s: result %d", ents[i].what, out.result);
			/* The same entry over the socket fails the same way. */
			cr_assert_eq(moet_submit_socket(c, &ents[i].q, &out), 0);
			cr_expect_eq(out.result, ents[i].expect, "%s (socket): result %d", ents[i].what, out.result);
			check_alive(good);
		}
		/* The client that sent all that still works too. */
		check_alive(c);
		moet_close(c);
	}
	moet_close(good);
	teardown(&e);
}

/* ---- an unauthorised uid ---------------------------------------------------- */

Test(server, unauthorised_uid_refused, .timeout = 60)
{
	if (geteuid() != 0)
		cr_skip_test("needs root to switch to uid 65534");
	struct env e = { 0 };
	make_model(&e);
	/* The socket is connectable by anyone; the daemon must still refuse. */
	start_daemon(&e, "1M", "--socket-mode=0666");
	pid_t kid = fork();
	if (kid == 0) {
		if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
			_exit(3);
		moet_ctx *c;
		struct moet_connect_opts o = { sizeof(o), e.sock, NULL, "intruder", 0, 0, 0 };
		int rc = moet_connect(&o, &c);
		_exit(rc == MOET_E_REFUSED ? 0 : rc == 0 ? 4 : 5);
	}
	int st;
	waitpid(kid, &st, 0);
	cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0, "unprivileged client: status %d", WEXITSTATUS(st));
	moet_ctx *c = attach(&e, "root");
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &txt), 0);
	cr_expect(strstr(txt, "\"clients_refused\": 1") != NULL);
	free(txt);
	moet_close(c);
	teardown(&e);
}

/* ---- restart under a connected client --------------------------------------- */

Test(server, restart_under_client, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", NULL);
	moet_ctx *c = attach(&e, "survivor");
	check_alive(c);
	cr_assert_eq(stop_daemon(&e), 0);
	uint32_t id = 2;
	int32_t slot;
	moet_lease l;
	int rc = moet_acquire(c, 0, &id, 1, 0, &slot, NULL, &l);
	cr_expect_eq(rc, MOET_E_DISCONNECTED, "got %d (%s)", rc, moet_strerror(rc));
	moet_close(c);
	moet_ctx *none;
	struct moet_connect_opts o = { sizeof(o), e.sock, NULL, "x", 0, 0, 0 };
	cr_expect_eq(moet_connect(&o, &none), MOET_E_UNAVAILABLE);
	start_daemon(&e, "1M", NULL);
	c = attach(&e, "survivor-again");
	check_alive(c);
	moet_close(c);
	teardown(&e);
}

/* ---- misc: residency bitmap, counters, route, socket dir check ------------ */

Test(server, residency_counters_route, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", NULL);
	moet_ctx *c = attach(&e, "observer");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	uint8_t mask[64];
	cr_assert_eq(moet_resident(c, 2, MOET_TIER_HOST, mask, sizeof(mask)), 0);
	uint32_t ids[2] = { 5, 9 };
	int32_t slots[2];
	moet_lease l;
	cr_assert_eq(moet_acquire(c, 2, ids, 2, MOET_F_NOWAIT, slots, NULL, &l), 0);
	cr_expect_eq(slots[0], -1);
	/* The ready event: wait until both loads show in the bitmap. */
	int res = 0;
	for (int i = 0; i < 100 && res < 2; i++) {
		moet_wait_ready(c, 2, 100);
		res = moet_resident(c, 2, MOET_TIER_HOST, mask, sizeof(mask));
	}
	cr_expect_eq(res, 2);
	cr_expect(mask[5] && mask[9] && !mask[0]);
	cr_assert_eq(moet_acquire(c, 2, ids, 2, MOET_F_NOWAIT, slots, NULL, &l), 2);
	cr_assert_eq(moet_release(c, l), 0);
	size_t n = (size_t)mi.n_moe_layers * mi.n_experts;
	uint64_t *h = calloc(n, 8), *m = calloc(n, 8), *ld = calloc(n, 8);
	cr_assert_eq(moet_expert_counters(c, h, m, ld, NULL), (int)n);
	cr_expect_eq(m[2 * mi.n_experts + 5], 1);
	cr_expect_eq(h[2 * mi.n_experts + 5], 1);
	cr_expect_eq(ld[2 * mi.n_experts + 9], 1);
	free(h);
	free(m);
	free(ld);
	/* ROUTE: logits with a clear top-2 (experts 7 and 3). */
	float logits[64] = { 0 };
	logits[7] = 5;
	logits[3] = 4;
	uint32_t ex[MOET_MAX_BATCH];
	float w[MOET_MAX_BATCH];
	int k = moet_route(c, 0, logits, mi.n_experts, 0, ex, w, slots, NULL, &l);
	cr_assert_eq(k, (int)mi.top_k);
	cr_expect_eq(ex[0], 7);
	cr_expect_eq(ex[1], 3);
	cr_expect(w[0] > w[1] && w[1] > 0);
	cr_expect(slots[0] >= 0);
	cr_expect_eq(moet_release(c, l), 0);
	cr_expect_eq(moet_release(c, l), -ESTALE);
	/* The host arena is mapped read-only. */
	const void *p = moet_slot_ptr(c, MOET_TIER_HOST, 0);
	cr_assert_not_null(p);
	cr_expect_eq(mprotect((void *)((uintptr_t)p & ~4095ul), 4096, PROT_READ | PROT_WRITE), -1);
	moet_close(c);
	teardown(&e);
}

/* A counter of the served model's cache, from the JSON stats. */
static json_int_t cache_stat(moet_ctx *c, const char *group, const char *name, const char *field)
{
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &txt), 0);
	json_error_t je;
	json_t *root = json_loads(txt, 0, &je);
	cr_assert_not_null(root, "%s: %s", je.text, txt);
	const char *key;
	json_t *model, *v = NULL;
	json_object_foreach(json_object_get(root, "models"), key, model) {
		v = json_object_get(json_object_get(model, group), name);
		if (field)
			v = json_object_get(v, field);
		break;
	}
	cr_assert(json_is_integer(v), "no %s.%s in %s", group, name, txt);
	json_int_t r = json_integer_value(v);
	json_decref(root);
	free(txt);
	return r;
}

/* The daemon is where blocking acquires wait (parked on the ring thread):
 * one that finds every host slot leased waits wait-timeout-ms, then completes
 * with its miss, and the cache's stall, wait-time and timeout counters say so. */
Test(server, parked_acquire_times_out_and_is_counted, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "60K", "--wait-timeout-ms=300");
	moet_ctx *c = attach(&e, "waiter");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	uint32_t n = mi.n_slots[MOET_TIER_HOST];
	cr_assert(n > 0 && n < mi.n_experts && n <= MOET_MAX_BATCH, "%u host slots", n);
	/* Every slot leased (a blocking acquire: the loads are waited for). */
	uint32_t ids[MOET_MAX_BATCH];
	int32_t slots[MOET_MAX_BATCH];
	for (uint32_t i = 0; i < n; i++)
		ids[i] = i;
	moet_lease held, l;
	cr_assert_eq(moet_acquire(c, 0, ids, n, 0, slots, NULL, &held), (int)n);
	json_int_t stalls = cache_stat(c, "counters", "cache_stalls", NULL);
	json_int_t waits = cache_stat(c, "histograms", "acquire_wait_ns", "count");
	cr_assert_eq(cache_stat(c, "counters", "cache_timeouts", NULL), 0);
	/* One more expert: no slot can be freed, so it waits, then times out. */
	uint32_t more = n;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	cr_assert_eq(moet_acquire(c, 0, &more, 1, 0, slots, NULL, &l), 0);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double waited = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	cr_expect_eq(slots[0], -1);
	cr_expect_geq(waited, 0.25, "returned after %.3f s, before wait-timeout-ms", waited);
	cr_expect_eq(cache_stat(c, "counters", "cache_timeouts", NULL), 1);
	cr_expect_eq(cache_stat(c, "counters", "cache_stalls", NULL), stalls + 1);
	cr_expect_eq(cache_stat(c, "histograms", "acquire_wait_ns", "count"), waits + 1);
	/* With the slots released, the same acquire waits for its load only. */
	cr_assert_eq(moet_release(c, held), 0);
	cr_assert_eq(moet_acquire(c, 0, &more, 1, 0, slots, NULL, &l), 1);
	cr_expect_eq(cache_stat(c, "counters", "cache_timeouts", NULL), 1);
	cr_assert_eq(moet_release(c, l), 0);
	moet_close(c);
	teardown(&e);
}

Test(server, refuses_world_writable_socket_dir, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	char run[600];
	snprintf(run, sizeof(run), "%s/run", e.dir);
	cr_assert_eq(chmod(run, 0777), 0);
	int st = tu_sh("%s --foreground --config= --socket=%s --socket-group= %s 2>%s", tu_build_path("moetierd"), e.sock,
		       e.pack, e.log);
	cr_expect_eq(st, 1);
	size_t len;
	char *log = tu_read_file(e.log, &len);
	cr_expect(log && strstr(log, "writable by others"), "%s", log ? log : "");
	free(log);
	teardown(&e);
}

Test(server, no_daemon_is_unavailable, .timeout = 10)
{
	moet_ctx *c;
	struct moet_connect_opts o = { sizeof(o), "/nonexistent/moetierd.sock", NULL, "x", 0, 0, 0 };
	cr_expect_eq(moet_connect(&o, &c), MOET_E_UNAVAILABLE);
	cr_expect(strlen(moet_strerror(MOET_E_UNAVAILABLE)) > 0);
}

/* ---- privileges after start-up ---------------------------------------------- */

static uint64_t status_hex_of(const char *path, const char *key)
{
	char line[256];
	uint64_t v = ~0ull;
	FILE *f = fopen(path, "r");
	if (!f)
		return v;
	size_t kl = strlen(key);
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, kl) && line[kl] == ':')
			v = strtoull(line + kl + 1, NULL, 16);
	fclose(f);
	return v;
}

Test(server, drops_capabilities_and_installs_seccomp, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	/* The emulated GPU tier's workers and the cache's I/O thread start
	 * before the drop: each thread must have dropped. */
	start_daemon(&e, "1M", "--seccomp --gpu-bytes=256K");
	/* Only CAP_IPC_LOCK(14), CAP_SYS_NICE(23), CAP_PERFMON(38), CAP_BPF(39)
	 * may remain, in every set of every thread, whatever we started with. */
	const uint64_t allowed = (1ull << 14) | (1ull << 23) | (1ull << 38) | (1ull << 39);
	const char *sets[] = { "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb" };
	char dir[64];
	snprintf(dir, sizeof(dir), "/proc/%d/task", (int)e.pid);
	DIR *d = opendir(dir);
	cr_assert(d, "%s", dir);
	struct dirent *de;
	unsigned threads = 0;
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		char path[128];
		snprintf(path, sizeof(path), "%s/%s/status", dir, de->d_name);
		threads++;
		for (unsigned i = 0; i < 5; i++) {
			uint64_t v = status_hex_of(path, sets[i]);
			cr_expect_eq(v & ~allowed, 0, "thread %s: %s = %#lx keeps more than allowed", de->d_name, sets[i],
				     (unsigned long)v);
		}
		cr_expect_eq(status_hex_of(path, "NoNewPrivs"), 1, "thread %s", de->d_name);
		cr_expect_eq(status_hex_of(path, "Seccomp"), 2, "thread %s: no seccomp filter (mode 2)", de->d_name);
	}
	closedir(d);
	cr_expect_geq(threads, 3, "only %u threads seen", threads);
	/* And it still serves (io_uring loads after the filter). */
	moet_ctx *c = attach(&e, "after-lockdown");
	uint32_t ids[3] = { 0, 8, 15 };
	int32_t slots[3];
	moet_lease l;
	cr_expect_eq(moet_acquire(c, 2, ids, 3, 0, slots, NULL, &l), 3);
	cr_expect_eq(moet_release(c, l), 0);
	moet_close(c);
	teardown(&e);
}

/* ---- COMPUTE against the kernels run here on bytes read from the pack ------ */

Test(server, compute_matches_local_ffn, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", NULL);
	moet_ctx *c = attach(&e, "compute");
	struct moet_model_info mi = { .size = sizeof(mi) };
	moet_model_info(c, &mi);
	cr_assert(mi.caps & MOET_CAP_COMPUTE);
	enum { T = 3, K = 2 };
	uint32_t n = mi.hidden, experts[T * K] = { 1, 4, 4, 9, 15, 1 };
	float w[T * K] = { 0.75f, 0.25f, 0.5f, 0.5f, 0.9f, 0.1f };
	float *x = calloc((size_t)T * n, 4), *y = calloc((size_t)T * n, 4), *ref = calloc((size_t)T * n, 4);
	for (uint32_t i = 0; i < T * n; i++)
		x[i] = (float)((i * 37 % 23) - 11) / 16.0f;
	/* Not resident yet: -EAGAIN, and the loads start. */
	int rc = moet_compute(c, 1, T, K, experts, w, x, y);
	cr_expect_eq(rc, -EAGAIN, "got %d", rc);
	for (int i = 0; i < 200 && rc == -EAGAIN; i++) {
		moet_wait_ready(c, 1, 50);
		rc = moet_compute(c, 1, T, K, experts, w, x, y);
	}
	cr_assert_eq(rc, T, "compute: %s", moet_strerror(rc));
	/* Reference: the same kernels, run here on the pack's own bytes. */
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	struct ffn_layout L;
	cr_assert_eq(ffn_layout_init(&L, pf->model, pf->hdr->parts, pf->hdr->n_parts, pack_extent_bytes(pf), &err), 0,
		     "%s", err.msg);
	void *ext[K];
	for (unsigned t = 0; t < T; t++) {
		for (unsigned j = 0; j < K; j++) {
			ext[j] = aligned_alloc(4096, pack_extent_bytes(pf));
			cr_assert_eq(pack_read_expert(pf, 1, experts[t * K + j], ext[j], &err), 0);
		}
		cr_assert_eq(ffn_moe_token(&L, (const void *const *)ext, &w[t * K], K, &x[t * n], &ref[t * n], 1), 0);
		for (unsigned j = 0; j < K; j++)
			free(ext[j]);
	}
	for (uint32_t i = 0; i < T * n; i++)
		cr_expect_eq(y[i], ref[i], "y[%u] = %g, local %g", i, y[i], ref[i]);
	/* Bad requests fail alone. */
	uint32_t bad[T * K] = { 1, 4, 4, 999, 15, 1 };
	cr_expect_eq(moet_compute(c, 1, T, K, bad, w, x, y), -ERANGE);
	cr_expect_eq(moet_compute(c, 77, T, K, experts, w, x, y), -ERANGE);
	check_alive(c);
	pack_close(pf);
	free(x);
	free(y);
	free(ref);
	moet_close(c);
	teardown(&e);
}

/* ---- GPU arena handles for clients ------------------------------------------ */

Test(server, gpu_arena_export_read_only_and_bytes, .timeout = 60)
{
	struct env e = { 0 };
	struct pack_file *pf;
	struct moe_error err;
	make_model(&e);
	start_daemon(&e, "1M", "--gpu-bytes=512K");
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	moet_ctx *c = attach(&e, "gpu");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	cr_assert_gt(mi.n_slots[MOET_TIER_GPU], 0);

	struct moet_gpu_export x;
	int fds[MOET_GPU_EXPORT_BATCH];
	uint64_t off[MOET_GPU_EXPORT_BATCH];
	int n = moet_gpu_export(c, 0, &x, fds, off, MOET_GPU_EXPORT_BATCH);
	cr_assert_eq(n, 1, "gpu export: %d %s", n, moet_last_error(c));
	cr_assert_eq(x.backend, MOET_GPU_EMULATED);
	cr_assert_eq(x.total, 1);
	cr_assert_eq(off[0], 0);
	cr_assert_geq(x.chunk_bytes, x.slot_stride * mi.n_slots[MOET_TIER_GPU]);
	/* A handle past the end is refused; the connection keeps working. */
	struct moet_gpu_export x2;
	cr_assert_eq(moet_gpu_export(c, 2, &x2, fds + 1, off + 1, 1), -EINVAL);

	/* The client can map it only read-only. */
	void *w = mmap(NULL, x.chunk_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
	cr_assert_eq(w, MAP_FAILED, "a writable mapping of the GPU region was allowed");
	const uint8_t *g = mmap(NULL, x.chunk_bytes, PROT_READ, MAP_SHARED, fds[0], 0);
	cr_assert_neq(g, MAP_FAILED, "mmap: %s", strerror(errno));

	/* Ask for an expert on the GPU tier until it is served from there; its
	 * bytes in the exported region equal the pack's. */
	uint32_t id = 3;
	int32_t slot = -1;
	uint8_t tier = MOET_TIER_HOST;
	for (int i = 0; i < 100 && tier != MOET_TIER_GPU; i++) {
		moet_lease lease;
		cr_assert_geq(moet_acquire(c, 0, &id, 1, MOET_F_WANT_GPU, &slot, &tier, &lease), 0);
		if (tier == MOET_TIER_GPU) {
			uint8_t *ref = aligned_alloc(4096, pack_extent_bytes(pf));
			cr_assert_eq(pack_read_expert(pf, 0, id, ref, &err), 0, "%s", err.msg);
			cr_assert_eq(memcmp(g + (uint64_t)slot * x.slot_stride, ref, pf->hdr->extent_payload), 0,
				     "GPU slot %d differs from the pack", slot);
			free(ref);
		}
		moet_release(c, lease);
		if (tier != MOET_TIER_GPU)
			probe_sleep_ms(20);
	}
	cr_assert_eq(tier, MOET_TIER_GPU, "expert never served from the GPU tier");
	munmap((void *)g, x.chunk_bytes);
	close(fds[0]);
	moet_close(c);
	pack_close(pf);
	teardown(&e);
}

/* ---- move or compute: ADVISE and the cost model in stats -------------------- */

Test(server, advise_move_or_compute, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", "--gpu-bytes=512K");
	moet_ctx *c = attach(&e, "advise");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);

	/* Expert 2 is brought to the host tier; 5 stays on NVMe. */
	uint32_t id = 2;
	int32_t slot;
	uint8_t t;
	moet_lease lease;
	cr_assert_eq(moet_acquire(c, 0, &id, 1, 0, &slot, &t, &lease), 1);
	cr_assert_eq(t, MOET_TIER_HOST);
	uint32_t ids[2] = { 2, 5 };
	uint8_t where[2], tier[2];
	float host_us[2], move_us[2];
	cr_assert_eq(moet_advise(c, 0, ids, 2, 1, where, tier, host_us, move_us), 2, "%s", moet_last_error(c));
	cr_assert_eq(tier[0], MOET_TIER_HOST);
	cr_assert_eq(tier[1], MOET_TIER_NVME);
	for (int i = 0; i < 2; i++) {
		cr_assert(where[i] == MOET_WHERE_HOST || where[i] == MOET_WHERE_MOVE);
		cr_assert_gt(host_us[i], 0.0f);
		cr_assert_gt(move_us[i], 0.0f);
		/* the answer is the cheaper of the two estimates */
		cr_assert_eq(where[i] == MOET_WHERE_HOST, host_us[i] <= move_us[i], "expert %u: host %g us, move %g us",
			     ids[i], host_us[i], move_us[i]);
	}
	/* An expert still on NVMe costs a read more either way. */
	cr_assert_gt(host_us[1], host_us[0]);
	/* More tokens cost the host more arithmetic, never less. */
	float h64[2], m64[2];
	cr_assert_eq(moet_advise(c, 0, ids, 2, 64, where, tier, h64, m64), 2);
	cr_assert_geq(h64[0], host_us[0]);
	moet_release(c, lease);

	/* Bad requests fail alone. */
	uint32_t bad = mi.n_experts;
	cr_assert_eq(moet_advise(c, 0, &bad, 1, 1, where, NULL, NULL, NULL), -EINVAL);
	cr_assert_eq(moet_advise(c, mi.n_moe_layers, ids, 1, 1, where, NULL, NULL, NULL), -EINVAL);
	cr_assert_eq(moet_advise(c, 0, ids, 1, 0, where, NULL, NULL, NULL), -EINVAL);
	cr_assert_eq(moet_advise(c, 0, ids, 2, 1, where, NULL, NULL, NULL), 2);

	/* The decisions and the model's inputs are in the stats. */
	char *st = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_TEXT, &st), 0);
	cr_assert(strstr(st, "compute_host_bytes_per_s") && strstr(st, "compute_host_to_gpu_bytes_per_s"), "%s", st);
	const char *d = strstr(st, "compute_decide_host");
	const char *mv = strstr(st, "compute_decide_move");
	cr_assert(d && mv);
	unsigned long nh = strtoul(d + strlen("compute_decide_host"), NULL, 10);
	unsigned long nm = strtoul(mv + strlen("compute_decide_move"), NULL, 10);
	cr_assert_eq(nh + nm, 6, "6 decisions were asked for, stats count %lu + %lu", nh, nm);
	free(st);
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &st), 0);
	cr_assert(strstr(st, "\"decide_host\""), "%s", st);
	free(st);
	moet_close(c);
	teardown(&e);
}

/* ---- many tenants (issue 14) ------------------------------------------------ */

static json_int_t server_stat(moet_ctx *c, const char *name)
{
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &txt), 0);
	json_error_t je;
	json_t *root = json_loads(txt, 0, &je);
	cr_assert_not_null(root, "%s: %s", je.text, txt);
	json_t *v = json_object_get(json_object_get(root, "server"), name);
	cr_assert(json_is_integer(v), "no server.%s in %s", name, txt);
	json_int_t r = json_integer_value(v);
	json_decref(root);
	free(txt);
	return r;
}

static int control_connect(struct env *e, moet_ctx **c)
{
	struct moet_connect_opts o = { sizeof(o), e->sock, NULL, "moectl", 0, 1, 0 };
	return moet_connect(&o, c);
}

/* Waits until the daemon closes fd (EOF or an error reply then EOF). */
static bool closed_by_daemon(int fd, int ms)
{
	struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	uint8_t buf[4096];
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
			return true;
		if (n < 0)
			return false;
	}
}

/* Connections that never say HELLO: those of other users cannot take the
 * slots kept for admins, and every one is closed after hello-timeout-ms, so
 * root's moectl always gets in and everyone else soon does. */
Test(server, silent_connections_cannot_lock_out_admins, .timeout = 90)
{
	struct env e = { 0 };
	make_model(&e);
	enum { MAXC = 8 };
	if (geteuid() == 0) {
		/* No deadline: the admin reserve alone must let root in. */
		start_daemon(&e, "1M", "--max-clients=8 --hello-timeout-ms=0 --socket-mode=0666 --seccomp");
		int pfd[2], done[2];
		cr_assert_eq(pipe(pfd), 0);
		cr_assert_eq(pipe(done), 0);
		pid_t kid = fork();
		if (kid == 0) {
			close(pfd[0]);
			close(done[1]);
			if (setresgid(65534, 65534, 65534) || setresuid(65534, 65534, 65534))
				_exit(3);
			int fds[MAXC];
			for (int i = 0; i < MAXC; i++)
				fds[i] = raw_connect(&e);
			probe_sleep_ms(200); /* let the daemon accept them all */
			char x = 1;
			if (write(pfd[1], &x, 1) != 1)
				_exit(4);
			if (read(done[0], &x, 1) < 0)
				_exit(5);
			for (int i = 0; i < MAXC; i++)
				close(fds[i]);
			_exit(0);
		}
		close(pfd[1]);
		close(done[0]);
		char x;
		cr_assert_eq(read(pfd[0], &x, 1), 1);
		moet_ctx *c = NULL;
		int rc = control_connect(&e, &c);
		cr_expect_eq(rc, 0, "root's moectl with %d silent connections of uid 65534 held: %s (%s)", MAXC,
			     moet_strerror(rc), moet_last_error(NULL));
		if (rc == 0) {
			cr_expect_geq(server_stat(c, "clients_refused"), 1);
			moet_close(c);
		}
		close(done[1]);
		int st;
		waitpid(kid, &st, 0);
		cr_expect(WIFEXITED(st) && WEXITSTATUS(st) == 0);
		close(pfd[0]);
		stop_daemon(&e);
	}
	/* Same uid (an admin too), every slot taken: the deadline frees them. */
	start_daemon(&e, "1M", "--max-clients=8 --hello-timeout-ms=300 --seccomp");
	int fds[MAXC];
	for (int i = 0; i < MAXC; i++)
		fds[i] = raw_connect(&e);
	for (int i = 0; i < MAXC; i++)
		cr_expect(closed_by_daemon(fds[i], 5000), "silent connection %d still open after 5 s", i);
	moet_ctx *c = NULL;
	int rc = control_connect(&e, &c);
	cr_assert_eq(rc, 0, "%s (%s)", moet_strerror(rc), moet_last_error(NULL));
	cr_expect_eq(server_stat(c, "hello_timeouts"), MAXC);
	moet_close(c);
	/* A client that says HELLO in time is never closed by the deadline. */
	c = attach(&e, "prompt");
	probe_sleep_ms(800);
	check_alive(c);
	moet_close(c);
	for (int i = 0; i < MAXC; i++)
		close(fds[i]);
	teardown(&e);
}

/* An expert whose extent cannot be read is answered its error per expert
 * (the slot holds the negative errno), at once while it is marked bad,
 * re-read only with backoff, and logged a bounded number of times: 20
 * tokens over a truncated pack cost a few reads per expert, not a storm. */
Test(server, unreadable_expert_is_marked_bad_not_stormed, .timeout = 90)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "1M", "--wait-timeout-ms=2000 --seccomp");
	moet_ctx *c = attach(&e, "replay");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	uint32_t last = mi.n_moe_layers - 1, n = mi.n_experts;
	cr_assert(n <= MOET_MAX_BATCH);
	/* The last MoE layer's extents are cut off the pack under the daemon. */
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0);
	uint64_t cut = UINT64_MAX;
	for (uint32_t x = 0; x < n; x++)
		cut = MOE_MIN(cut, pack_expert(pf, last, x)->offset);
	pack_close(pf);
	cr_assert_eq(truncate(e.pack, (off_t)cut), 0);
	json_int_t errs0 = cache_stat(c, "counters", "nvme_errors", NULL);
	uint32_t ids[MOET_MAX_BATCH];
	int32_t slots[MOET_MAX_BATCH];
	for (uint32_t x = 0; x < n; x++)
		ids[x] = x;
	unsigned eio = 0;
	for (int tok = 0; tok < 20; tok++) {
		for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
			moet_lease lease;
			int r = moet_acquire(c, l, ids, n, 0, slots, NULL, &lease);
			cr_assert_geq(r, 0, "acquire: %s", moet_strerror(r));
			for (uint32_t x = 0; l == last && x < n; x++) {
				cr_expect(slots[x] < 0, "a truncated extent was served");
				eio += slots[x] == -EIO;
			}
			cr_assert_eq(moet_release(c, lease), 0);
		}
		probe_sleep_ms(50);
	}
	json_int_t reads = cache_stat(c, "counters", "nvme_errors", NULL) - errs0;
	cr_expect_geq(eio, 19 * n, "only %u of %u lookups of the bad layer said EIO", eio, 20 * n);
	/* ~1.2 s of tokens: the first read and at most a couple of re-checks. */
	cr_expect_leq(reads, 4 * (json_int_t)n, "%lld failed reads for %u bad experts", (long long)reads, n);
	cr_expect_geq(reads, (json_int_t)n);
	/* Reported per expert. */
	char *txt = NULL;
	cr_assert_eq(moet_stats(c, MOET_STATS_JSON, &txt), 0);
	cr_expect(strstr(txt, "\"bad_expert_count\": 16") != NULL, "%s", txt);
	cr_expect(strstr(txt, "\"error\": \"EIO\"") != NULL);
	free(txt);
	moet_close(c);
	char cmd[1200];
	snprintf(cmd, sizeof(cmd), "grep -c 'loading layer' %s", e.log);
	FILE *p = popen(cmd, "r");
	int lines = -1;
	cr_assert(p && fscanf(p, "%d", &lines) == 1);
	pclose(p);
	fprintf(stderr, "truncated pack, 20 tokens: %u bad experts, %u lookups answered EIO, %lld failed reads, %d log lines\n",
		n, eio, (long long)reads, lines);
	cr_expect_leq(lines, 3 * (int)n, "%d log lines about failed loads for %u bad experts", lines, n);
	teardown(&e);
}

/* A corrupt extent (CRC32C mismatch) is answered EBADMSG in its slot, and
 * moe-client acquire names it and exits non-zero instead of printing miss. */
Test(server, corrupt_expert_reported_per_expert, .timeout = 60)
{
	struct env e = { 0 };
	make_model(&e);
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0);
	uint64_t off = pack_expert(pf, 0, 3)->offset;
	pack_close(pf);
	int fd = open(e.pack, O_WRONLY);
	cr_assert(fd >= 0);
	uint8_t junk[64];
	memset(junk, 0xa5, sizeof(junk));
	cr_assert_eq(pwrite(fd, junk, sizeof(junk), (off_t)off + 100), (ssize_t)sizeof(junk));
	close(fd);
	start_daemon(&e, "1M", NULL);
	moet_ctx *c = attach(&e, "checker");
	uint32_t ids[2] = { 2, 3 };
	int32_t slots[2];
	moet_lease lease;
	cr_assert_eq(moet_acquire(c, 0, ids, 2, 0, slots, NULL, &lease), 1);
	cr_expect_geq(slots[0], 0);
	cr_expect_eq(slots[1], -EBADMSG, "slot of the corrupt expert: %d", slots[1]);
	cr_assert_eq(moet_release(c, lease), 0);
	moet_close(c);
	char out[1024];
	snprintf(out, sizeof(out), "%s/acq.out", e.dir);
	int rc = tu_sh("%s --socket %s acquire 0 2 3 >%s 2>&1", tu_build_path("moe-client"), e.sock, out);
	cr_expect_neq(rc, 0, "moe-client acquire of a corrupt expert exited 0");
	cr_expect_eq(tu_sh("grep -q 'expert 3.*EBADMSG' %s", out), 0, "no EBADMSG named for expert 3");
	cr_expect_neq(tu_sh("grep -q 'expert 3 *miss' %s", out), 0, "the corrupt expert printed as a miss");
	tu_sh("cat %s >&2", out);
	/* replay: a trace of 3 tokens, one of which routes to the corrupt expert */
	char trace[1024];
	snprintf(trace, sizeof(trace), "%s/t.csv", e.dir);
	FILE *tf = fopen(trace, "w");
	cr_assert_not_null(tf);
	fprintf(tf, "Layer ID,Batch Number,Token,Activated Expert IDs\n0,0,a,\"[1, 2]\"\n0,0,b,\"[3, 4]\"\n"
		    "0,0,c,\"[5, 2]\"\n");
	fclose(tf);
	rc = tu_sh("%s --socket %s replay --brief %s >%s 2>&1", tu_build_path("moe-client"), e.sock, trace, out);
	tu_sh("cat %s >&2", out);
	cr_expect_neq(rc, 0, "moe-client replay over a corrupt expert exited 0");
	cr_expect_eq(tu_sh("grep -q 'layer 0 expert 3: EBADMSG' %s", out), 0, "replay does not name the corrupt expert");
	teardown(&e);
}

/* One client cannot lease the whole host arena: over its client-share it is
 * told -EDQUOT per expert at once, and another client's acquires are served
 * within their normal latency instead of waiting out wait-timeout-ms. */
Test(server, greedy_client_cannot_starve_others, .timeout = 90)
{
	struct env e = { 0 };
	make_model(&e);
	start_daemon(&e, "480K", "--wait-timeout-ms=5000 --client-share=50 --seccomp");
	moet_ctx *greedy = attach(&e, "greedy");
	moet_ctx *other = attach(&e, "other");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(greedy, &mi), 0);
	uint32_t slots_host = mi.n_slots[MOET_TIER_HOST];
	cr_assert(mi.n_moe_layers >= 3 && mi.n_experts <= MOET_MAX_BATCH && slots_host < mi.n_moe_layers * mi.n_experts,
		  "%u slots for %u x %u experts", slots_host, mi.n_moe_layers, mi.n_experts);
	/* The greedy client asks for every expert and holds what it gets. */
	moet_lease held[8];
	unsigned served = 0, quota_errs = 0, nh = 0;
	uint32_t ids[MOET_MAX_BATCH];
	int32_t slots[MOET_MAX_BATCH];
	for (uint32_t x = 0; x < mi.n_experts; x++)
		ids[x] = x;
	struct timespec t0, t1;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (uint32_t l = 0; l < mi.n_moe_layers && nh < 8; l++) {
		int r = moet_acquire(greedy, l, ids, mi.n_experts, 0, slots, NULL, &held[nh++]);
		cr_assert_geq(r, 0, "%s", moet_strerror(r));
		served += (unsigned)r;
		for (uint32_t x = 0; x < mi.n_experts; x++)
			quota_errs += slots[x] == -EDQUOT;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double greedy_s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	/* Four experts the greedy client does not hold, for the other one. */
	/* The last experts of the last layer: the ones the greedy client asked
	 * for last, so it holds none of them (leases on one slot are shared). */
	uint32_t nw = 4, want[4];
	for (uint32_t k = 0; k < nw; k++)
		want[k] = mi.n_experts - nw + k;
	uint32_t layer = mi.n_moe_layers - 1;
	int32_t os[4];
	moet_lease ol;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	int r = moet_acquire(other, layer, want, nw, 0, os, NULL, &ol);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	double other_s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
	fprintf(stderr, "greedy: %u of %u served, %u over its share (%.3f s); other: %d of %u served in %.3f s\n", served,
		mi.n_moe_layers * mi.n_experts, quota_errs, greedy_s, r, nw, other_s);
	cr_expect_eq(r, (int)nw, "the other client got %d of %u experts in %.3f s", r, nw, other_s);
	cr_expect_lt(other_s, 2.0, "the other client waited %.3f s", other_s);
	cr_expect_lt(greedy_s, 4.0, "the greedy client waited %.3f s for slots it holds itself", greedy_s);
	cr_expect_gt(quota_errs, 0);
	cr_expect_eq(server_stat(other, "share_refusals"), quota_errs);
	cr_expect_leq(served, slots_host / 2 + 4);
	cr_assert_eq(moet_release(other, ol), 0);
	for (unsigned i = 0; i < nh; i++)
		cr_assert_eq(moet_release(greedy, held[i]), 0);
	/* Alone, a client may use the whole arena again. */
	moet_close(other);
	probe_sleep_ms(200);
	served = 0;
	for (uint32_t l = 0; l < 2; l++) {
		int rr = moet_acquire(greedy, l, ids, mi.n_experts, 0, slots, NULL, &held[l]);
		cr_assert_geq(rr, 0);
		served += (unsigned)rr;
	}
	cr_expect_gt(served, slots_host / 2 + 4, "alone: %u served", served);
	moet_close(greedy);
	teardown(&e);
}

/* ROUTE through the daemon follows the model's own rule, bias included: on a
 * DeepSeek-V3 model (sigmoid scores, e_score_correction_bias for selection,
 * groups, scaling) the daemon's answer for each layer equals route.c's with
 * that layer's bias from the pack, for all-zero logits (where only the bias
 * decides: the daemon once answered [0, 1] there) and for random ones. */
Test(server, route_uses_each_layers_score_bias, .timeout = 60)
{
	struct env e;
	make_model_of(&e, "--family deepseek_v3 --preset tiny --experts 16 --top-k 4 --layers 4");
	start_daemon(&e, "1M", NULL);
	moet_ctx *c = attach(&e, "route");
	struct moet_model_info mi = { .size = sizeof(mi) };
	cr_assert_eq(moet_model_info(c, &mi), 0);
	struct pack_file *pf;
	struct moe_error err;
	cr_assert_eq(pack_open(e.pack, PACK_OPEN_NO_DIRECT, &pf, &err), 0, "%s", err.msg);
	cr_assert(pf->model->has_score_bias, "the generated DeepSeek-V3 model has no score bias");
	unsigned seed = 5, differ = 0;
	for (uint32_t l = 0; l < mi.n_moe_layers; l++) {
		float bias[64], logits[64] = { 0 };
		const struct pack_tensor_entry *t = pack_find_role(pf, PACK_ROLE_SCORE_BIAS, moe_model_layer_of(pf->model, l));
		cr_assert_not_null(t);
		cr_assert_eq(pack_read_tensor(pf, t, bias, &err), 0, "%s", err.msg);
		struct route_params rp;
		route_params_from_model(&rp, pf->model, bias);
		for (int pass = 0; pass < 2; pass++) {
			if (pass)
				for (uint32_t i = 0; i < mi.n_experts; i++)
					logits[i] = (float)((int)(rand_r(&seed) % 2001) - 1000) / 500.0f;
			struct route_result want;
			cr_assert_eq(route_topk(&rp, logits, &want), 0);
			uint32_t ex[MOET_MAX_BATCH];
			float w[MOET_MAX_BATCH];
			int32_t slots[MOET_MAX_BATCH];
			moet_lease lease = 0;
			int k = moet_route(c, l, logits, mi.n_experts, 0, ex, w, slots, NULL, &lease);
			cr_assert_eq(k, (int)want.n, "layer %u: %d experts, route.c says %u", l, k, want.n);
			for (int i = 0; i < k; i++) {
				cr_expect_eq(ex[i], want.experts[i], "layer %u pass %d slot %d: %u, route.c %u", l, pass, i,
					     ex[i], want.experts[i]);
				cr_expect_float_eq(w[i], want.weights[i], 1e-6f);
			}
			/* the bias matters: without it the zero-logit answer would be 0, 1, 2, ... */
			if (!pass && (ex[0] != 0 || ex[1] != 1))
				differ++;
			if (lease)
				moet_release(c, lease);
		}
	}
	cr_expect_gt(differ, 0, "every layer's bias-free answer: the test would not see a dropped bias");
	pack_close(pf);
	moet_close(c);
	teardown(&e);
}
