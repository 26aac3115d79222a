#!/bin/busybox sh
# /init of the emulated guest: print the CPU flags, run each parity test with AVX-512 on, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
exec >/dev/ttyS0 2>&1
echo "=== GUEST UP: $(cat /proc/uptime)"
echo "=== cpu model: $(grep -m1 'model name' /proc/cpuinfo)"
echo "=== flags: $(grep -m1 '^flags' /proc/cpuinfo)"
for f in avx512f avx512bw avx512_vnni avx512vl fma avx2; do
  if grep -m1 '^flags' /proc/cpuinfo | grep -qw $f; then echo "=== has $f: yes"; else echo "=== has $f: NO"; fi
done
export RAYON_NUM_THREADS=1 RUST_BACKTRACE=1
T=/ops_parity
echo "=== --list"; $T --list
for t in $(cat /tests.txt); do
  echo "=== RUN $t start uptime $(cut -d' ' -f1 /proc/uptime)"
  $T --exact "$t" --test-threads=1 --nocapture
  echo "=== DONE $t rc=$? uptime $(cut -d' ' -f1 /proc/uptime)"
done
echo "=== ALL DONE"
sync; sleep 2
poweroff -f
