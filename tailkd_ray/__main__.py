import sys

from tailkd_ray.cli import main

sys.exit(main())
