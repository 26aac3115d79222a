#!/bin/sh
# The #[test] function names of a test file, space-separated.
grep -A1 '^#\[test\]' "$1" | sed -n 's/^fn \([a-z0-9_]*\).*/\1/p' | tr '\n' ' '
