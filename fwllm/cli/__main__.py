import sys

from fwllm.cli import main

sys.exit(main())
