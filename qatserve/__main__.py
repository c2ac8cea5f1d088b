from qatserve.cli import main

raise SystemExit(main())
