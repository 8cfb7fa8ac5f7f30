"""`python -m mnist_dist.cli ARGS` = `mnist-dist ARGS`."""

import sys

from mnist_dist.cli.app import main

sys.exit(main())
