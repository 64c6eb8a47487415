#!/bin/sh
# The README's main job (scripts/demo) end to end, with one trace.
set -eu
S=${MOETIER_SRCDIR:-.}
DEMO_TRACES=1 exec "$S/scripts/demo"
