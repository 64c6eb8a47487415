/* server.c - the service's life cycle: create, start, the event loop, stop
 * and destroy (server.h). The work is done in server_conn.c (connections,
 * HELLO), server_ring.c (the data plane), server_admin.c (admin requests)
 * and server_model.c (the served models and their shared regions). */
#include "config.h"
#include <errno.h>
#include <grp.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "cache.h"
#include "server_impl.h"

uint64_t server_counter(const struct server *s, enum server_counter id)
{
	return atomic_load_explicit(&((struct server *)s)->counters[id], memory_order_relaxed);
}

unsigned server_n_models(const struct server *s) { return s->n_models; }
struct cache *server_model_cache(struct server *s, unsigned i) { return i < s->n_models ? s->models[i].cache : NULL; }

void server_kick_ring(struct server *s)
{
	__atomic_add_fetch(&s->ctl_word, 1, __ATOMIC_SEQ_CST);
	syscall(SYS_futex, &s->ctl_word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static int lookup_group(const char *name, gid_t *out)
{
	struct group gr, *res = NULL;
	char buf[4096];
	char *end;
	unsigned long v = strtoul(name, &end, 10);
	if (*name && !*end) {
		*out = (gid_t)v;
		return 0;
	}
	if (getgrnam_r(name, &gr, buf, sizeof(buf), &res) || !res)
		return -ENOENT;
	*out = res->gr_gid;
	return 0;
}

/* The eBPF programs, aimed at the devices holding the packs and at the
 * arenas' memfds; one that cannot load leaves its reason in the stats. */
static int start_bpf(struct server *s)
{
	struct bpf_obs_config bc = { .tgid = getpid(), .disabled = !s->cfg->bpf };
	struct stat st;

	for (unsigned i = 0; i < s->n_models; i++) {
		struct served_model *m = &s->models[i];
		if (fstat(m->pack->fd, &st) == 0) {
			unsigned d = 0;
			while (d < bc.n_devs && bc.devs[d] != st.st_dev)
				d++;
			if (d == bc.n_devs && bc.n_devs < IOLAT_MAX_DEVS)
				bc.devs[bc.n_devs++] = st.st_dev;
		}
		for (int t = 0; t < 2 && bc.n_arenas < FAULTS_MAX_ARENAS; t++) {
			if (m->arena_ro_fd[t] < 0 || fstat(m->arena_ro_fd[t], &st) < 0)
				continue;
			bc.arenas[bc.n_arenas].dev = st.st_dev;
			bc.arenas[bc.n_arenas].ino = st.st_ino;
			bc.arenas[bc.n_arenas].base = m->arena[t].base;
			bc.arenas[bc.n_arenas].len = m->arena[t].bytes;
			snprintf(bc.arenas[bc.n_arenas].name, sizeof(bc.arenas[0].name), "%s%s%.8s",
				 t == CACHE_TIER_GPU ? "gpu" : "host", s->n_models > 1 ? ":" : "",
				 s->n_models > 1 ? m->name : "");
			bc.n_arenas++;
		}
	}
	return bpf_obs_start(&bc, &s->bpf);
}

int server_create(struct moetierd_config *cfg, struct server **out, struct moe_error *err)
{
	struct server *s = calloc(1, sizeof(*s));
	int rc;
	if (!s)
		return moe_error_set(err, -ENOMEM, "out of memory");
	s->cfg = cfg;
	s->listen_fd = s->epfd = s->sig_fd = s->timer_fd = s->reap_fd = -1;
	s->start_ns = moe_now_ns();
	s->max_clients = cfg->max_clients;
	atomic_store(&s->ring_cpu, -1);
	pthread_mutex_init(&s->lock, NULL);
	s->clients = calloc(s->max_clients, sizeof(*s->clients));
	if (!s->clients) {
		free(s);
		return moe_error_set(err, -ENOMEM, "out of memory");
	}
	if (cfg->socket_group && *cfg->socket_group) {
		if (lookup_group(cfg->socket_group, &s->sock_gid)) {
			rc = moe_error_set(err, -ENOENT, "socket-group '%s' does not exist (create it: sysusers.d/moetier.conf)",
					   cfg->socket_group);
			goto fail;
		}
		s->have_sock_gid = true;
	}
	if (cfg->admin_group && *cfg->admin_group) {
		if (lookup_group(cfg->admin_group, &s->admin_gid)) {
			rc = moe_error_set(err, -ENOENT, "admin-group '%s' does not exist", cfg->admin_group);
			goto fail;
		}
		s->have_admin_gid = true;
	}
	/* Packs: comma-separated. */
	char *list = strdup(cfg->pack ? cfg->pack : "");
	unsigned n = 0;
	for (char *p = list; p && *p; p++)
		if (*p == ',')
			n++;
	n = list && *list ? n + 1 : 0;
	if (!n) {
		free(list);
		rc = moe_error_set(err, -EINVAL, "no pack to serve (give --pack=FILE or a PACK argument)");
		goto fail;
	}
	s->models = calloc(n, sizeof(*s->models));
	if (!s->models) {
		free(list);
		rc = moe_error_set(err, -ENOMEM, "out of memory");
		goto fail;
	}
	char *save = NULL;
	for (char *tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		struct served_model *m = &s->models[s->n_models];
		m->shared_fd = m->shared_ro_fd = m->arena_ro_fd[0] = m->arena_ro_fd[1] = -1;
		s->n_models++;
		if ((rc = server_model_open(s, m, tok, s->n_models - 1, err))) {
			free(list);
			goto fail;
		}
	}
	free(list);
	/* Before the privilege drop and seccomp: loading needs CAP_BPF. */
	if ((rc = start_bpf(s)) < 0) {
		rc = moe_error_set(err, rc, "out of memory");
		goto fail;
	}
	if ((rc = server_conn_bind(s, err)))
		goto fail;
	*out = s;
	return 0;
fail:
	server_destroy(s);
	return rc;
}

int server_pin_ring_thread(struct server *s, int cpu)
{
	atomic_store(&s->ring_cpu, cpu);
	if (!s->ring_started)
		return 0;
	cpu_set_t set;
	CPU_ZERO(&set);
	if (cpu < 0) {
		for (int i = 0; i < CPU_SETSIZE; i++)
			CPU_SET(i, &set);
	} else {
		CPU_SET(cpu, &set);
	}
	return -pthread_setaffinity_np(s->ring_thread, sizeof(set), &set);
}

int server_start(struct server *s, struct moe_error *err)
{
	int rc = pthread_create(&s->ring_thread, NULL, server_ring_main, s);
	if (rc)
		return moe_error_set(err, -rc, "ring thread: %s", strerror(rc));
	s->ring_started = true;
	if (atomic_load(&s->ring_cpu) >= 0)
		server_pin_ring_thread(s, atomic_load(&s->ring_cpu));
	return 0;
}

void server_stop(struct server *s)
{
	atomic_store(&s->stop_loop, true);
	if (s->reap_fd >= 0) {
		uint64_t one = 1;
		ssize_t r = write(s->reap_fd, &one, 8);
		(void)r;
	}
}

void server_block_signals(sigset_t *mask)
{
	sigset_t m;
	sigemptyset(&m);
	sigaddset(&m, SIGTERM);
	sigaddset(&m, SIGINT);
	sigaddset(&m, SIGHUP);
	pthread_sigmask(SIG_BLOCK, &m, NULL);
	if (mask)
		*mask = m;
}

static void notify_status(struct server *s)
{
	unsigned n = 0;
	pthread_mutex_lock(&s->lock);
	for (unsigned i = 0; i < s->max_clients; i++)
		if (s->clients[i] && s->clients[i]->hello_done)
			n++;
	pthread_mutex_unlock(&s->lock);
	sd_notifyf(0, "STATUS=serving %u model(s), %u client(s), %" PRIu64 " ring entries", s->n_models, n,
		   server_counter(s, SERVER_ring_entries));
}

int server_run(struct server *s, struct moe_error *err)
{
	sigset_t mask;
	server_block_signals(&mask);
	s->epfd = epoll_create1(EPOLL_CLOEXEC);
	s->sig_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
	s->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (s->reap_fd < 0)
		s->reap_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (s->epfd < 0 || s->sig_fd < 0 || s->timer_fd < 0 || s->reap_fd < 0)
		return moe_error_set(err, -errno, "event loop set-up: %s", strerror(errno));
	uint64_t period_ns = 1000000000ull;
	if (sd_watchdog_enabled(0, &s->watchdog_usec) > 0 && s->watchdog_usec)
		period_ns = MOE_MIN(period_ns, s->watchdog_usec * 1000ull / 2);
	/* The tick also closes connections whose HELLO is overdue. */
	if (s->cfg->hello_timeout_ms)
		period_ns = MOE_MIN(period_ns, MOE_MAX(s->cfg->hello_timeout_ms, 20u) * 1000000ull / 4);
	struct itimerspec its = { { (time_t)(period_ns / 1000000000ull), (long)(period_ns % 1000000000ull) },
				  { (time_t)(period_ns / 1000000000ull), (long)(period_ns % 1000000000ull) } };
	timerfd_settime(s->timer_fd, 0, &its, NULL);
	static int tags[4];
	struct epoll_event ev = { .events = EPOLLIN };
	ev.data.ptr = &tags[0];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->listen_fd, &ev);
	ev.data.ptr = &tags[1];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->sig_fd, &ev);
	ev.data.ptr = &tags[2];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->timer_fd, &ev);
	ev.data.ptr = &tags[3];
	epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->reap_fd, &ev);
	sd_notifyf(0, "READY=1\nSTATUS=serving %u model(s) on %s", s->n_models, s->cfg->socket);
	moe_info("listening on %s", s->cfg->socket);
	while (!atomic_load(&s->stop_loop)) {
		struct epoll_event evs[32];
		int n = epoll_wait(s->epfd, evs, 32, -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return moe_error_set(err, -errno, "epoll_wait: %s", strerror(errno));
		}
		for (int i = 0; i < n; i++) {
			void *p = evs[i].data.ptr;
			if (p == &tags[0]) {
				server_conn_accept(s);
			} else if (p == &tags[1]) {
				struct signalfd_siginfo si;
				while (read(s->sig_fd, &si, sizeof(si)) == sizeof(si)) {
					if (si.ssi_signo == SIGHUP) {
						moe_info("SIGHUP: nothing to reload (use moectl config set)");
						continue;
					}
					moe_info("signal %u: stopping", si.ssi_signo);
					sd_notify(0, "STOPPING=1");
					atomic_store(&s->stop_loop, true);
				}
			} else if (p == &tags[2]) {
				uint64_t v;
				if (read(s->timer_fd, &v, 8) < 0 && errno != EAGAIN)
					moe_warn("timerfd: %s", strerror(errno));
				if (s->watchdog_usec)
					sd_notify(0, "WATCHDOG=1");
				notify_status(s);
				server_conn_sweep(s);
				server_kick_ring(s);
			} else if (p == &tags[3]) {
				server_conn_reap(s);
			} else {
				struct srv_client *c = p;
				if (evs[i].events & EPOLLIN)
					server_conn_readable(s, c);
				else if (evs[i].events & (EPOLLHUP | EPOLLRDHUP | EPOLLERR))
					server_conn_close(s, c);
			}
		}
	}
	return 0;
}

void server_destroy(struct server *s)
{
	if (!s)
		return;
	if (s->ring_started) {
		atomic_store(&s->stop_ring, true);
		server_kick_ring(s);
		pthread_join(s->ring_thread, NULL);
	}
	for (unsigned i = 0; s->clients && i < s->max_clients; i++) {
		struct srv_client *c = s->clients[i];
		if (!c)
			continue;
		if (c->fd >= 0)
			close(c->fd);
		if (c->m)
			cache_release_client(c->m->cache, c->cache_id);
		server_conn_free(c);
	}
	bpf_obs_stop(s->bpf);
	for (unsigned i = 0; i < s->n_models; i++)
		server_model_close(&s->models[i]);
	if (s->listen_fd >= 0)
		close(s->listen_fd);
	if (s->sock_path) {
		unlink(s->sock_path);
		free(s->sock_path);
	}
	int fds[] = { s->epfd, s->sig_fd, s->timer_fd, s->reap_fd };
	for (unsigned i = 0; i < 4; i++)
		if (fds[i] >= 0)
			close(fds[i]);
	free(s->models);
	free(s->clients);
	pthread_mutex_destroy(&s->lock);
	free(s);
}
