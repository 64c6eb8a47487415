/* fuzz_ctl.c - libFuzzer target for every control message of the unix
 * socket: each input is one connection, accepted by the real
 * server_conn_accept, whose messages are read and dispatched by the real
 * server_conn_readable (header checks, HELLO, SUBMIT, STATS, CONFIG_GET/SET,
 * PIN/UNPIN/EVICT, CLIENTS, GPU_EXPORT, ADVISE and unknown types), as the
 * event loop does on EPOLLIN; then it hangs up.
 *
 * Input: records of [u8 mode][u16 n][n bytes].
 *   mode & 1: the n bytes are [u16 type][u32 arg][payload] and a correct
 *             header is built around them (magic, version, length, seq), so
 *             the fuzzer reaches the payload decoders quickly;
 *   otherwise the n bytes are sent as they are (header checks);
 *   mode & 2: a descriptor rides along (SCM_RIGHTS): the server must close it.
 * The fuzzer's peer is the daemon's own uid, hence an admin.
 *
 * Checked beyond the sanitizers: no client record outlives its connection,
 * no descriptor leaks (counted before and after each input), the cache's invariants.
 *
 * Build: ./configure --enable-fuzz && make tests/fuzz/fuzz_ctl
 * Run:   tests/fuzz/fuzz_ctl -dict=$srcdir/tests/fuzz/ctl.dict CORPUS $srcdir/tests/fuzz/corpus/ctl */
#include "config.h"

#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>

#include "fuzz_server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Messages that passed the header checks, by type (printed at exit: the
 * campaign's proof that every message was exercised). */
static uint64_t by_type[32], n_inputs;

static void print_types(void)
{
	fprintf(stderr, "fuzz_ctl: %llu inputs; messages by type:", (unsigned long long)n_inputs);
	for (unsigned t = 0; t < 32; t++)
		if (by_type[t])
			fprintf(stderr, " %u:%llu", t, (unsigned long long)by_type[t]);
	fprintf(stderr, "\n");
}

static int send_one(int fd, const uint8_t *buf, size_t n, bool with_fd)
{
	struct iovec iov = { (void *)buf, n };
	union {
		char b[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1 };
	int extra = -1;
	if (with_fd) {
		extra = open("/dev/null", O_RDONLY | O_CLOEXEC);
		memset(&u, 0, sizeof(u));
		mh.msg_control = u.b;
		mh.msg_controllen = sizeof(u.b);
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &extra, sizeof(int));
	}
	ssize_t r = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
	if (extra >= 0)
		close(extra);
	return r < 0 ? -errno : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct server *s = fz_server();
	static bool once;
	if (!once) {
		once = true;
		atexit(print_types);
	}
	if (size > 64 * 1024)
		return 0;
	n_inputs++;
	int fds_before = fz_count_fds();
	int cfd;
	struct srv_client *c = fz_connect(s, &cfd);
	unsigned idx = c->idx;
	uint32_t seq = 0;
	while (size >= 3 && fz_alive(s, c, idx) && c->fd >= 0) {
		uint8_t mode = data[0];
		uint16_t n;
		memcpy(&n, data + 1, 2);
		data += 3;
		size -= 3;
		if (n > size)
			n = (uint16_t)size;
		uint8_t msg[MOET_MAX_MSG + 256];
		size_t len;
		if ((mode & 1) && n >= 6) {
			struct moet_msg h = { MOET_MSG_MAGIC, MOET_PROTO_VERSION, 0, ++seq, 0, 0, 0 };
			memcpy(&h.type, data, 2);
			memcpy(&h.arg, data + 2, 4);
			size_t pl = n - 6u;
			if (pl > sizeof(msg) - sizeof(h))
				pl = sizeof(msg) - sizeof(h);
			h.len = (uint32_t)pl;
			memcpy(msg, &h, sizeof(h));
			memcpy(msg + sizeof(h), data + 6, pl);
			len = sizeof(h) + pl;
			if (h.type < 32)
				by_type[h.type]++;
		} else {
			len = n < sizeof(msg) ? n : sizeof(msg);
			memcpy(msg, data, len);
		}
		data += n;
		size -= n;
		/* descriptors ride on any message, zero-length ones too (they
		 * leaked once: tests/fuzz/known/ctl-zero-length-fd) */
		bool fd = (mode & 2) != 0;
		if (send_one(cfd, msg, len, fd))
			break;
		server_conn_readable(s, c);
		fz_drain(cfd);
	}
	fz_hangup(s, c, idx, cfd);
	fz_reset_config();
	/* PIN outlives its connection by design: undone so inputs stay independent */
	for (uint32_t l = 0; l < FZ_LAYERS; l++)
		for (uint32_t e = 0; e < FZ_EXPERTS; e++)
			for (int t = 0; t < 2; t++)
				cache_unpin(s->models[0].cache, (struct cache_key){ l, e }, (enum cache_tier)t);
	fz_check_idle(s);
	if (fz_count_fds() != fds_before) {
		fz_count_fds_show(true);
		fz_die("descriptors", "more open after the input than before: a leak");
	}
	return 0;
}
