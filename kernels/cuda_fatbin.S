/* cuda_fatbin.S - embeds the CUDA fatbin of kernels/ffn.cu (built by nvcc
 * into the build tree as kernels/ffn.fatbin) as read-only data, so the one
 * binary carries its GPU kernels and loads them with cuModuleLoadData. The
 * path is relative to the directory make runs the assembler in, the top
 * build directory, so VPATH builds find the generated file. Exposed to C by
 * ffn_cuda_fatbin() in ffn.c. */
	.section .rodata.moe_ffn_fatbin, "a", @progbits
	.balign 64
	.globl moe_ffn_fatbin_start
	.type moe_ffn_fatbin_start, @object
moe_ffn_fatbin_start:
	.incbin "kernels/ffn.fatbin"
	.globl moe_ffn_fatbin_end
	.type moe_ffn_fatbin_end, @object
moe_ffn_fatbin_end:
	.byte 0
	.size moe_ffn_fatbin_start, moe_ffn_fatbin_end - moe_ffn_fatbin_start
	.size moe_ffn_fatbin_end, 1
	.section .note.GNU-stack, "", @progbits
