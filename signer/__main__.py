import sys

from signer.cli.main import main

sys.exit(main())
