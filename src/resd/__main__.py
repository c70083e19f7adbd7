from resd.cli import main

raise SystemExit(main())
