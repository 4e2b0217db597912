#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
#
# check-insns.sh ELF...
#
# Fails if any code section of a guest contains an instruction that the KVM
# of our development hosts cannot emulate in guest kernel mode, or may run
# with different results: SSE/AVX/MMX/x87 (registers %xmm/%ymm/%zmm/%mm/%st
# or x87/SSE state instructions), xsave/xrstor, cmpxchg16b, and the
# BMI/LZCNT/TZCNT/POPCNT/MOVBE/ADX family (see docs in /work/shared and
# tests/guests/README.md). Each code section is disassembled in its own mode:
# .setup and .text16 as 16-bit, .head32 and 32-bit ELFs as 32-bit, the rest
# as 64-bit.
set -eu
status=0
for elf in "$@"; do
	if od -An -tx1 -j4 -N1 "$elf" | grep -q 01; then deflt=i386; else deflt=x86-64; fi
	sections=$(objdump -h "$elf" | awk '/^ *[0-9]+ / { name = $2; getline; if ($0 ~ /CODE/) print name }')
	for sec in $sections; do
		case "$sec" in
		.setup|.text16) mode=i8086 ;;
		.head32) mode=i386 ;;
		*) mode=$deflt ;;
		esac
		bad=$(objdump -d -M "$mode" -j "$sec" "$elf" | awk -F '\t' '
			NF >= 3 {
				insn = $3
				n = split(insn, w, " ")
				m = ""
				for (i = 1; i <= n; i++) {
					if (w[i] ~ /^(rep|repz|repnz|repe|repne|lock|data16|data32|addr16|addr32|cs|ds|es|ss|fs|gs|notrack|bnd|rex.*|\(bad\))$/) continue
					m = w[i]; break
				}
				if (insn ~ /%(x|y|z)mm[0-9]|%mm[0-9]|%st(\(|$|,| )/ ||
				    m ~ /^f[a-z0-9]*$/ ||
				    m ~ /^(emms|femms|ldmxcsr|stmxcsr|vldmxcsr|vstmxcsr|xsave.*|xrstor.*|fxsave.*|fxrstor.*|cmpxchg16b|lzcnt|tzcnt|popcnt|andn|bextr|blsi|blsr|blsmsk|bzhi|pdep|pext|rorx|sarx|shlx|shrx|mulx|adcx|adox|movbe|movnti|crc32.*)$/ ||
				    m ~ /^(v|p)[a-z]/ && insn ~ /%(x|y|z)?mm/)
					print "    " $0
			}')
		if [ -n "$bad" ]; then
			echo "check-insns: $elf ($sec, $mode): forbidden instructions:" >&2
			echo "$bad" >&2
			status=1
		fi
	done
done
exit $status
