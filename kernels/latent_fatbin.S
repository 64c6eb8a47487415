/* latent_fatbin.S - embeds the CUDA fatbin of kernels/latent.cu (built by nvcc
 * into the build tree as kernels/latent.fatbin) as read-only data, so the one
 * binary carries its GPU kernels and loads them with cuModuleLoadData. The
 * path is relative to the directory make runs the assembler in, the top
 * build directory, so VPATH builds find the generated file. Exposed to C by
 * latent_cuda_fatbin() in latent.c. */
	.section .rodata.moe_latent_fatbin, "a", @progbits
	.balign 64
	.globl moe_latent_fatbin_start
	.type moe_latent_fatbin_start, @object
moe_latent_fatbin_start:
	.incbin "kernels/latent.fatbin"
	.globl moe_latent_fatbin_end
	.type moe_latent_fatbin_end, @object
moe_latent_fatbin_end:
	.byte 0
	.size moe_latent_fatbin_start, moe_latent_fatbin_end - moe_latent_fatbin_start
	.size moe_latent_fatbin_end, 1
	.section .note.GNU-stack, "", @progbits
