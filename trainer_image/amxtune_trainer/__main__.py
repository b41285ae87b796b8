import sys

from amxtune_trainer.cli import main

sys.exit(main())
