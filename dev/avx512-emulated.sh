#!/usr/bin/env bash
# Runs tests/ops_parity.rs with the AVX-512 VNNI kernels on a machine without AVX-512: a static
# test binary boots as /init of a Debian kernel inside bochs's Tiger Lake CPU model (AVX-512F/BW/
# VL/VNNI), since QEMU's TCG does not emulate AVX-512. Needs Debian's package archive (apt-get
# download, no root) and ~15 min on 2 cores (the static build dominates; bochs takes ~2 min).
# Prints the guest's console and exits 0 only if every test passed in a guest that has VNNI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
HERE=$ROOT/dev/avx512-emulated
WORK=${AVX512_EMULATED_WORK:-$ROOT/target/avx512-emulated}
TESTS=$("$HERE/list-tests.sh" "$ROOT/tests/ops_parity.rs")
mkdir -p "$WORK/debs" "$WORK/root"

# 1. bochs, a kernel, busybox and an ISO toolchain, unpacked (not installed) under $WORK/root.
cd "$WORK/debs"
if [ ! -e .done ]; then
  kernel=$(apt-cache search --names-only '^linux-image-[0-9.]+-[0-9]+-cloud-amd64$' | sort -V | tail -1 | cut -d' ' -f1)
  # bochs-bin links GTK even when run without a display.
  apt-get download bochs bochsbios vgabios bochs-term libltdl7 libsamplerate0 libgtk-3-0 libepoxy0 \
    libwayland-cursor0 libwayland-egl1 busybox-static \
    isolinux syslinux-common xorriso libisoburn1 libburn4 libisofs6 libjte2 "$kernel"
  for d in *.deb; do dpkg -x "$d" "$WORK/root"; done
  touch .done
fi
R=$WORK/root

# 2. The parity tests, linked statically (--target: crt-static on the host triple breaks proc-macros).
cd "$ROOT"
CARGO_TARGET_DIR=$WORK/target RUSTFLAGS="-C target-feature=+crt-static" \
  cargo test --release --target x86_64-unknown-linux-gnu --test ops_parity --no-run
bin=$(ls -t "$WORK"/target/x86_64-unknown-linux-gnu/release/deps/ops_parity-* | grep -v '\.d$' | head -1)

# 3. initramfs (busybox + /init + the binary) and a bootable ISO.
rm -rf "$WORK/initramfs" "$WORK/iso"
mkdir -p "$WORK"/initramfs/{bin,proc,sys,dev} "$WORK/iso/isolinux"
cp "$R/bin/busybox" "$WORK/initramfs/bin/"
cp "$HERE/init.sh" "$WORK/initramfs/init"
cp "$bin" "$WORK/initramfs/ops_parity"
echo "$TESTS" > "$WORK/initramfs/tests.txt"
(cd "$WORK/initramfs" && find . | "$R/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null | gzip -1 > "$WORK/iso/initrd.gz")
cp "$R"/boot/vmlinuz-* "$WORK/iso/vmlinuz"
cp "$R/usr/lib/ISOLINUX/isolinux.bin" "$R/usr/lib/syslinux/modules/bios/ldlinux.c32" "$HERE/isolinux.cfg" "$WORK/iso/isolinux/"
LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu "$R/usr/bin/xorriso" -as mkisofs -quiet -o "$WORK/boot.iso" \
  -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 -boot-info-table "$WORK/iso"

# 4. Boot. The debugger built into Debian's bochs stops at the first instruction: "c" continues.
sed "s|@R@|$R|g; s|@WORK@|$WORK|g" "$HERE/bochsrc.in" > "$WORK/bochsrc"
printf 'c\nq\n' > "$WORK/continue.rc"
rm -f "$WORK/serial.txt"
LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu LTDL_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu/bochs/plugins \
  timeout 1800 "$R/usr/bin/bochs-bin" -q -f "$WORK/bochsrc" -rc "$WORK/continue.rc" </dev/null >"$WORK/bochs.out" 2>&1 || true
cat "$WORK/serial.txt"
grep -q "=== has avx512_vnni: yes" "$WORK/serial.txt" || { echo "FAIL: the guest has no AVX-512 VNNI"; exit 1; }
grep -q "kernels: \[Portable, Avx2, Avx512Vnni\]" "$WORK/serial.txt" || { echo "FAIL: Avx512Vnni did not run"; exit 1; }
ran=$(grep -c "^=== DONE .* rc=0" "$WORK/serial.txt" || true)
want=$(echo "$TESTS" | wc -w)
[ "$ran" -eq "$want" ] || { echo "FAIL: $ran of $want tests passed"; exit 1; }
echo "PASS: $want ops_parity tests with Avx512Vnni in the emulated guest"
