/* crc32c.c - CRC32C through ISA-L (see doc/dependencies.md for why ISA-L). */
#include "config.h"
#include "crc32c.h"

#include <isa-l/crc.h>

uint32_t crc32c_update(uint32_t crc, const void *buf, size_t len)
{
	/* ISA-L's crc32_iscsi works on the raw register: no initial or final
	 * inversion, so invert around it to get the standard CRC32C. */
	const unsigned char *p = buf;
	uint32_t state = ~crc;
	while (len) {
		/* crc32_iscsi takes an int length. */
		int n = len > (1u << 30) ? (1 << 30) : (int)len;
		state = crc32_iscsi((unsigned char *)p, n, state);
		p += n;
		len -= (size_t)n;
	}
	return ~state;
}

uint32_t crc32c(const void *buf, size_t len)
{
	return crc32c_update(0, buf, len);
}
