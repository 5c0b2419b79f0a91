"""`python -m directpo.bench --child SPEC.json`: one measurement run (internal; use `directpo bench`)."""
import sys

from .child import child_main

if len(sys.argv) == 3 and sys.argv[1] == "--child":
    sys.exit(child_main(sys.argv[2]))
sys.exit("usage: python -m directpo.bench --child SPEC.json (internal; use `directpo bench`)")
