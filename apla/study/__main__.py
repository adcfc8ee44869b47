from apla.study.ablate import main

raise SystemExit(main())
