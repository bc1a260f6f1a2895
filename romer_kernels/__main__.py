import sys

from romer_kernels.cli.main import main

sys.exit(main())
